"""The scheduler's parts on their own, with fakes: the Finisher (every end of a job: store,
waiters, metrics), the continuous loop's schedule / execute / update called step by step, and
the loops' Wakeup. tests/test_scheduler.py drives the whole through the service."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from engine.metrics import Metrics
from engine.runtime.params import DecodingParams
from engine.serving.batching import BatchLimits, Lane
from engine.serving.clock import FakeClock
from engine.serving.continuous_loop import ContinuousLoop
from engine.serving.events import JobEvents, Row
from engine.serving.finishing import Finisher
from engine.serving.jobs import Job, JobStatus
from engine.serving.loop_base import LoopParts, Wakeup
from engine.serving.store.sqlite import SqliteJobStore
from engine.serving.worker import EngineWorker
from harness.fakes import FakeEngine, expected_tokens, fake_tokenize
from tests.stores import submission

CONTRASTIVE = DecodingParams(max_new_tokens=3, penalty_alpha=0.6, top_k=4)


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), timeout=30))


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


class Parts:
    def __init__(self, *, max_batch_size: int = 8, job_timeout_s: float = 60.0) -> None:
        self.clock = FakeClock()
        self.store = SqliteJobStore(":memory:")
        self.events = JobEvents()
        self.metrics = Metrics()
        self.finisher = Finisher(
            store=self.store,
            events=self.events,
            metrics=self.metrics,
            clock=self.clock,
            job_timeout_s=job_timeout_s,
        )
        self.engine = FakeEngine()
        worker = EngineWorker()
        worker.stop()  # unused: the tests call execute() themselves
        parts = LoopParts(
            store=self.store,
            engine=self.engine,
            worker=worker,
            clock=self.clock,
            limits=BatchLimits(max_batch_size=max_batch_size, max_batch_tokens=10_000, max_queue_delay_s=0.0),
            finisher=self.finisher,
            metrics=self.metrics,
            input_ids={},
            claiming=lambda: True,
        )
        self.loop = ContinuousLoop(parts, events=self.events, wakeup=Wakeup(self.clock))

    def submit(self, n: int, owner: str = "a", prompts: tuple[str, ...] = ("p q",)) -> Job:
        job = Job(id=f"j{n}", owner=owner, prompts=prompts, params=CONTRASTIVE, created_at=self.clock.time())
        self.store.enqueue(submission(job, sum(len(fake_tokenize(p)) for p in prompts)))
        return job

    def step(self) -> None:
        plan = self.loop.schedule()
        if plan is not None:
            self.loop.update(self.loop.execute(plan))


def test_a_step_is_schedule_then_execute_then_update() -> None:
    async def body() -> None:
        parts = Parts()
        job = parts.submit(1, prompts=("one two", "three"))
        stream = parts.events.subscribe(job.id)
        plan = parts.loop.schedule()  # claims the job: its two rows join the next step
        assert plan is not None and plan.batch is None and plan.cancels == []
        assert [row for row, _ in plan.adds] == [Row("j1", 0), Row("j1", 1)]
        assert parts.store.get("j1").status is JobStatus.RUNNING  # type: ignore[union-attr]
        output = parts.loop.execute(plan)  # one decoder step: a token per row, nothing published yet
        assert [(ev.row, ev.token_id >= 0) for ev in output.events] == [
            (Row("j1", 0), True),
            (Row("j1", 1), True),
        ]
        assert stream.empty()
        parts.loop.update(output)
        assert stream.qsize() == 2
        while parts.loop.active:
            parts.step()
        done = parts.store.get("j1")
        assert done is not None and done.status is JobStatus.COMPLETED and done.result is not None
        assert [list(t) for t in done.result.token_ids] == [
            expected_tokens(fake_tokenize(p), 3) for p in ("one two", "three")
        ]
        assert sample(parts.metrics, "engine_jobs_total", status="completed", finish_reason="length") == 1
        assert sample(parts.metrics, "engine_jobs_running") == 0
        assert parts.finisher.running == {}

    run(body)


def test_schedule_admits_keys_in_turn_and_takes_stopped_jobs_out() -> None:
    async def body() -> None:
        parts = Parts(max_batch_size=2)
        for n in range(4):
            parts.submit(n, owner="a")
        parts.submit(10, owner="b")
        plan = parts.loop.schedule()
        assert plan is not None
        assert {row.job_id for row, _ in plan.adds} == {"j0", "j10"}  # one of A's, then B's turn
        parts.loop.update(parts.loop.execute(plan))
        parts.finisher.running["j0"].cancelled = True
        parts.store.cancel("j0", parts.clock.time())
        plan = parts.loop.schedule()
        assert plan is not None and plan.cancels == [Row("j0", 0)] and plan.adds == []
        assert "j0" not in parts.finisher.running
        parts.loop.update(parts.loop.execute(plan))
        plan = parts.loop.schedule()  # the freed row goes to the next job in turn
        assert plan is not None and {row.job_id for row, _ in plan.adds} == {"j1"}

    run(body)


def test_the_finisher_ends_queued_and_running_jobs_in_the_store_waiters_and_metrics() -> None:
    async def body() -> None:
        parts = Parts(job_timeout_s=5.0)
        queued = parts.submit(1)
        running = parts.submit(2)
        [rj] = parts.finisher.claim(["j2"], parts.clock.time(), Lane.BATCH)
        assert sample(parts.metrics, "engine_jobs_running") == 1
        waiter = parts.events.waiter("j1")
        parts.clock.advance(6.0)
        assert parts.finisher.expire_queued(queued, parts.clock.time())
        assert waiter.done()
        assert parts.finisher.expire_running(parts.clock.time()) == [rj]
        for job in (queued, running):
            stored = parts.store.get(job.id)
            assert stored is not None and stored.status is JobStatus.FAILED
            assert stored.error is not None and stored.error.code == "timeout"
        assert sample(parts.metrics, "engine_jobs_total", status="failed", finish_reason="") == 2

    run(body)


def test_a_wakeup_ends_a_sleep_early() -> None:
    async def body() -> None:
        wake = Wakeup(FakeClock())
        sleeper = asyncio.ensure_future(wake.sleep(3600))
        await asyncio.sleep(0.01)
        assert not sleeper.done()
        wake.set()
        await asyncio.wait_for(sleeper, 1)
        wake.set()  # set while nobody sleeps: the next sleep returns at once
        await asyncio.wait_for(wake.sleep(3600), 1)

    run(body)
