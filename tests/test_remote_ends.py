"""RemoteEnds: a long poll on one server hears of the end of a job that another server runs
through one watcher per process, one store read per tick for all such waiters (issue 11)."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Sequence
from typing import Any

import pytest

from engine.runtime.params import DecodingParams
from engine.runtime.result import Usage
from engine.serving.jobs import Job, JobResult, JobStatus
from engine.serving.remote_ends import REMOTE_POLL_S, RemoteEnds
from engine.serving.store.base import JobStore
from engine.serving.store.sqlite import SqliteJobStore
from harness.fakes import FakeEngine, start_service, until
from tests.stores import submission

NOW = 1_700_000_000.0


def _job(n: int) -> Job:
    return Job(
        id=f"job{n}",
        owner="alice",
        prompts=(f"p{n}",),
        params=DecodingParams(max_new_tokens=4),
        created_at=NOW,
    )


def _result() -> JobResult:
    return JobResult(completion=("out",), token_ids=((1, 2),), usage=Usage(1, 2))


def test_ended_names_the_terminal_and_the_gone_jobs(job_store: JobStore) -> None:
    for n in range(4):
        job_store.enqueue(submission(_job(n), 1))
    job_store.claim(["job1", "job2"], NOW)
    assert job_store.complete("job2", 1, _result(), NOW)
    job_store.cancel("job3", NOW)
    # queued (job0) and running (job1) are live; completed, cancelled and unknown have ended
    assert job_store.ended(["job0", "job1", "job2", "job3", "nope"]) == {"job2", "job3", "nope"}
    assert job_store.ended([]) == set()


def test_one_tick_wakes_the_waiters_whose_job_ended_in_the_store() -> None:
    async def body() -> None:
        store = SqliteJobStore(":memory:")
        for n in range(3):
            store.enqueue(submission(_job(n), 1))
        ends = RemoteEnds(store, runs_here=lambda job_id: job_id == "job2")
        futs = {n: ends.watch(f"job{n}") for n in range(3)}
        await ends.tick()
        assert not any(f.done() for f in futs.values())
        store.claim(["job0", "job2"], NOW)
        assert store.complete("job0", 1, _result(), NOW)
        assert store.complete("job2", 1, _result(), NOW)
        await ends.tick()
        assert futs[0].done()  # ended in the store: woken
        assert not futs[1].done()  # still queued
        assert not futs[2].done()  # runs here: its end comes through JobEvents, not the store
        assert ends.watched == 2
        store.close()

    asyncio.run(body())


class CountingRedisStore:
    """A RedisJobStore that counts the reads a waiting server makes."""

    @staticmethod
    def make(url: str, prefix: str) -> Any:
        from engine.serving.store.redis import RedisJobStore

        class Counting(RedisJobStore):
            def __init__(self) -> None:
                super().__init__(url, prefix=prefix)
                self.ended_calls: list[list[str]] = []
                self.gets = 0

            def ended(self, job_ids: Sequence[str]) -> set[str]:
                self.ended_calls.append(list(job_ids))
                return super().ended(job_ids)

            def get(self, job_id: str) -> Job | None:
                self.gets += 1
                return super().get(job_id)

        return Counting()


def test_many_waiters_cost_one_store_read_per_tick(redis_url: str | None) -> None:
    if redis_url is None:
        pytest.skip("redis-server is not installed (make system-deps installs it)")
    from engine.serving.store.redis import RedisJobStore

    async def body() -> None:
        prefix = f"test:{uuid.uuid4().hex}:"
        gate = threading.Event()
        runner = await start_service(FakeEngine(gate=gate), store=RedisJobStore(redis_url, prefix=prefix))
        store = CountingRedisStore.make(redis_url, prefix)
        idle = await start_service(FakeEngine(gate=threading.Event()), store=store)
        idle._scheduler.stop_claiming()  # type: ignore[union-attr]
        views = [
            await runner.submit("alice", [f"p {i}"], DecodingParams(max_new_tokens=3)) for i in range(20)
        ]
        ids = sorted(v.job.id for v in views)
        waits = [asyncio.ensure_future(idle.wait("alice", job_id, timeout_s=20)) for job_id in ids]
        await until(lambda: idle.remote_ends.watched == 20)
        gets_while_waiting = store.gets
        calls_before = len(store.ended_calls)
        await until(lambda: len(store.ended_calls) >= calls_before + 3)
        # Three ticks: each one read of all 20 jobs, and no waiter read its own job meanwhile.
        assert all(sorted(call) == ids for call in store.ended_calls[calls_before:])
        assert store.gets == gets_while_waiting
        gate.set()  # the runner finishes them all
        done = await asyncio.gather(*waits)
        assert all(v.job.status is JobStatus.COMPLETED for v in done)
        assert idle.remote_ends.watched == 0
        # Each of the ticks after the end: one read of what was still waited on, never per waiter.
        assert all(len(call) <= 20 for call in store.ended_calls)
        idle_calls = len(store.ended_calls)
        await asyncio.sleep(REMOTE_POLL_S * 3)
        assert len(store.ended_calls) == idle_calls  # nobody waits: the watcher is idle
        await runner.stop()
        await idle.stop(drain_timeout_s=0)

    asyncio.run(asyncio.wait_for(body(), 30))
