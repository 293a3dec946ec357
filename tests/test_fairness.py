"""Fair turns across API keys: one key's flood never makes another key's job wait behind it.

Through the service with a FakeEngine, on SQLite and on a real Redis: key A queues 256 jobs, then
key B submits one; B's job completes long before A's backlog ends (it used to complete last)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from engine.runtime.params import DecodingParams
from engine.serving.batching import Lane, QueueEntry, fair_order
from engine.serving.jobs import Job, JobStatus
from engine.serving.store.base import JobStore
from harness.fakes import FakeEngine, start_service
from tests.stores import submission

GREEDY = DecodingParams(max_new_tokens=4)
CONTRASTIVE = DecodingParams(max_new_tokens=4, penalty_alpha=0.6, top_k=4)
FLOOD = 256
BATCH = 8


@pytest.mark.parametrize("params", [GREEDY, CONTRASTIVE], ids=["batch", "contrastive"])
def test_one_keys_flood_does_not_make_another_keys_job_wait_behind_it(
    job_store: JobStore, params: DecodingParams
) -> None:
    async def body() -> None:
        gate = threading.Event()  # the engine holds its first call until the flood is queued
        engine = FakeEngine(step_delay_s=0.001, contrastive_max_rows=BATCH, gate=gate)
        svc = await start_service(engine, store=job_store, max_batch_size=BATCH)
        flood = [await svc.submit("a", ["flood"], params) for _ in range(FLOOD)]
        b = await svc.submit("b", ["just one"], params)
        gate.set()
        done_b = await svc.wait("b", b.job.id, 30)
        assert done_b.job.status is JobStatus.COMPLETED
        a_done = job_store.count(JobStatus.COMPLETED) - 1
        # In turn: B's job went into the first batch (or the first free rows) after the one that
        # was running when it arrived. First in, first out ran it after all 256 of A's jobs.
        assert a_done < 2 * BATCH, f"B's job completed after {a_done} of A's {FLOOD} jobs"
        for v in flood:
            assert (await svc.wait("a", v.job.id, 30)).job.status is JobStatus.COMPLETED
        await svc.stop()

    asyncio.run(asyncio.wait_for(body(), timeout=120))


def entry(n: int, owner: str, prompts: int = 1) -> QueueEntry:
    return QueueEntry(f"{owner}{n}", n, 0.0, Lane.BATCH, "k", prompts, 10, 8, owner)


def test_fair_order_takes_keys_in_turn_and_rotates_the_first_place() -> None:
    queue = [entry(i, "a") for i in range(4)] + [entry(10, "b"), entry(11, "b"), entry(12, "c")]
    order = [e.job_id for e in fair_order(queue)]
    assert order == ["a0", "b10", "c12", "a1", "b11", "a2", "a3"]
    assert [e.job_id for e in fair_order(queue, after="a")][:3] == ["b10", "c12", "a0"]
    assert [e.job_id for e in fair_order(queue, after="c")][:3] == ["a0", "b10", "c12"]


def test_fair_order_counts_prompts_not_jobs() -> None:
    queue = [entry(0, "a", prompts=4), entry(1, "a", prompts=4)] + [entry(10 + i, "b") for i in range(6)]
    order = [e.job_id for e in fair_order(queue)]
    # A's first job holds 4 prompts: B gets four single-prompt turns before A's second job.
    assert order == ["a0", "b10", "b11", "b12", "b13", "a1", "b14", "b15"]


def test_one_owner_keeps_queue_order() -> None:
    queue = [entry(i, "a") for i in range(5)]
    assert fair_order(queue, after="zzz") == queue


def test_the_store_shows_every_keys_head_and_bounds_the_read_when_many_keys_wait(job_store: JobStore) -> None:
    for owner in range(40):
        for n in range(3):
            job = Job(id=f"k{owner}-{n}", owner=f"key{owner}", prompts=("p",), params=GREEDY, created_at=1.0)
            job_store.enqueue(submission(job, 2))
    few = [e.job_id for e in job_store.queued(Lane.BATCH, 8)]
    assert len(few) == 40  # 4 * 8 / 40 rounds down to 0: at least each key's head
    assert set(few) == {f"k{owner}-0" for owner in range(40)}
    many = job_store.queued(Lane.BATCH, 64)  # 4 * 64 / 40 = 6, more than any key has
    assert len(many) == 120 and [e.seq for e in many] == sorted(e.seq for e in many)


@pytest.mark.parametrize("contrastive", [False, True], ids=["batch", "contrastive"])
def test_the_loops_pass_the_first_place_on_after_each_batch(job_store: JobStore, contrastive: bool) -> None:
    """One job at a time, three keys with two jobs each: the engine runs them a, b, c, a, b, c. A
    loop that did not rotate its turn would run a's second job right after its first."""

    def params(n: int) -> DecodingParams:  # max_new_tokens tells the jobs apart
        if contrastive:
            return DecodingParams(max_new_tokens=n, penalty_alpha=0.6, top_k=4)
        return DecodingParams(max_new_tokens=n)

    async def body() -> None:
        gate = threading.Event()
        engine = FakeEngine(step_delay_s=0.001, contrastive_max_rows=4, gate=gate)
        svc = await start_service(engine, store=job_store, max_batch_size=1)
        views = []
        for owner, n in (("a", 4), ("a", 5), ("b", 6), ("b", 7), ("c", 8), ("c", 9)):
            views.append((owner, await svc.submit(owner, ["p"], params(n))))
        gate.set()
        done = [(await svc.wait(owner, v.job.id, 30)).job for owner, v in views]
        assert all(job.status is JobStatus.COMPLETED and job.finished_at is not None for job in done)
        by_end = sorted(done, key=lambda job: job.finished_at or 0.0)
        assert [job.params.max_new_tokens for job in by_end] == [4, 6, 8, 5, 7, 9]
        await svc.stop()

    asyncio.run(asyncio.wait_for(body(), timeout=60))
