"""JobService.wait on shutdown (issue 11 item 9): a wait answers the job only when it ended; when the
server stops first it raises NotReady with a retry-after, for a running job that outlives the
drain as for a queued one, and at once for a wait that starts during or after the drain. The real
server and its transports: tests/test_e2e_shutdown.py."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from engine.errors import NotReady
from engine.runtime.params import DecodingParams
from engine.serving.jobs import JobStatus
from engine.serving.store.sqlite import SqliteJobStore
from harness.fakes import FakeEngine, start_service, until


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), timeout=60))


def test_a_wait_for_a_job_that_outlives_the_drain_raises_not_ready() -> None:
    async def body() -> None:
        engine = FakeEngine(step_delay_s=0.01)
        svc = await start_service(engine)
        running = await svc.submit("a", ["r"], DecodingParams(max_new_tokens=500))
        await until(engine.started.is_set)
        waits = [
            asyncio.ensure_future(svc.wait("a", running.job.id)),
            asyncio.ensure_future(svc.wait("a", running.job.id, timeout_s=20)),
        ]
        await asyncio.sleep(0.05)
        await svc.stop(drain_timeout_s=0.1, close_store=False)
        for w in waits:
            with pytest.raises(NotReady, match="has not finished") as info:
                await w
            assert info.value.retry_after_s == 1.0
        job = svc.store.get(running.job.id)
        assert job is not None and job.status is JobStatus.QUEUED  # kept for the next server
        svc.store.close()

    run(body)


def test_jobs_that_end_in_the_drain_answer_their_waits_and_the_rest_raise() -> None:
    async def body() -> None:
        engine = FakeEngine(step_delay_s=0.005)
        svc = await start_service(engine, store=SqliteJobStore(":memory:"))
        running = await svc.submit("a", ["r"], DecodingParams(max_new_tokens=20))
        await until(engine.started.is_set)
        queued = await svc.submit("a", ["q"], DecodingParams(num_beams=2, max_new_tokens=8))
        wait_running = asyncio.ensure_future(svc.wait("a", running.job.id))
        wait_queued = asyncio.ensure_future(svc.wait("a", queued.job.id, timeout_s=20))
        await asyncio.sleep(0.01)
        stopping = asyncio.ensure_future(svc.stop(drain_timeout_s=10, close_store=False))
        await asyncio.sleep(0)
        # Stopping began: a new wait for a queued job answers at once (this server will not run it).
        with pytest.raises(NotReady):
            await svc.wait("a", queued.job.id, timeout_s=20)
        done = await wait_running
        assert done.job.status is JobStatus.COMPLETED  # it finished within the drain
        with pytest.raises(NotReady):
            await wait_queued
        await stopping
        # After the drain: waits raise at once, a plain read still answers.
        with pytest.raises(NotReady):
            await svc.wait("a", queued.job.id, timeout_s=20)
        assert (await svc.get("a", queued.job.id)).job.status is JobStatus.QUEUED
        assert (await svc.wait("a", running.job.id)).job.status is JobStatus.COMPLETED
        svc.store.close()

    run(body)
