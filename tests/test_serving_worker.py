"""The engine's threads run under SCHED_BATCH (Linux), and threads they start inherit it."""

from __future__ import annotations

import asyncio
import os
import sys
import threading

import pytest

from engine.config import Config
from engine.serving.worker import EngineWorker, run_in_new_thread

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="SCHED_BATCH is a Linux scheduling policy"
)


def policy_here() -> int:
    return os.sched_getscheduler(0)


def policy_of_a_thread_started_here() -> int:
    seen: list[int] = []
    t = threading.Thread(target=lambda: seen.append(policy_here()))
    t.start()
    t.join()
    return seen[0]


def test_the_worker_runs_engine_calls_under_sched_batch_and_the_loop_keeps_its_policy() -> None:
    async def body() -> None:
        loop_policy = policy_here()
        worker = EngineWorker(batch_scheduling=True)
        try:
            assert await worker.run(policy_here) == os.SCHED_BATCH
        finally:
            worker.stop()
        plain = EngineWorker(batch_scheduling=False)
        try:
            assert await plain.run(policy_here) == loop_policy
        finally:
            plain.stop()
        assert policy_here() == loop_policy

    asyncio.run(body())


def test_an_engine_loaded_on_its_own_thread_starts_its_threads_under_sched_batch() -> None:
    async def body() -> None:
        loop_policy = policy_here()
        assert (
            await run_in_new_thread(policy_of_a_thread_started_here, batch_scheduling=True) == os.SCHED_BATCH
        )
        assert await run_in_new_thread(policy_of_a_thread_started_here) == loop_policy
        with pytest.raises(ZeroDivisionError):  # errors come back to the caller
            await run_in_new_thread(lambda: 1 // 0, batch_scheduling=True)

    asyncio.run(body())


def test_batch_scheduling_is_on_by_default_and_can_be_turned_off_by_environment() -> None:
    assert Config().batch_scheduling is True
    assert Config.build({}, {"ENGINE_BATCH_SCHEDULING": "0"}).batch_scheduling is False
