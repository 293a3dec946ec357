"""The scheduler through the service with a FakeEngine: what reaches the engine, and when."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from engine.runtime.params import DecodingParams
from engine.runtime.protocols import DecoderBatchLike
from engine.runtime.result import GenerationRequest, TokenEvent
from engine.serving import continuous_loop
from engine.serving.batching import Lane, QueueEntry
from engine.serving.clock import FakeClock
from engine.serving.continuous_loop import ADMIT_POLL_S
from engine.serving.jobs import JobStatus
from engine.serving.store.sqlite import SqliteJobStore
from harness.fakes import FakeEngine, expected_tokens, fake_tokenize, start_service, until
from tests.stores import submission

GREEDY = DecodingParams(max_new_tokens=8)
CONTRASTIVE = DecodingParams(max_new_tokens=8, penalty_alpha=0.6, top_k=4)


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), timeout=60))


def test_concurrent_jobs_share_one_engine_call() -> None:
    async def body() -> None:
        engine = FakeEngine()
        svc = await start_service(engine, max_queue_delay_ms=200.0)
        views = await asyncio.gather(*(svc.submit("a", [f"job {i}"], GREEDY) for i in range(32)))
        for v in views:
            done = await svc.wait("a", v.job.id, 10)
            assert done.job.result is not None
            assert list(done.job.result.token_ids[0]) == expected_tokens(fake_tokenize(v.job.prompts[0]), 8)
        assert [c.rows for c in engine.calls] == [32]
        await svc.stop()

    run(body)


def test_the_queue_delay_is_waited_on_the_clock_then_a_partial_batch_goes() -> None:
    async def body() -> None:
        clock = FakeClock()
        engine = FakeEngine()
        svc = await start_service(engine, clock, max_queue_delay_ms=10.0)
        a = await svc.submit("a", ["a"], GREEDY)
        clock.advance(0.004)
        b = await svc.submit("a", ["b"], GREEDY)
        await asyncio.sleep(0.05)
        assert engine.calls == []  # 4 ms of 10 ms: still waiting for companions
        clock.advance(0.006)  # the oldest job's delay expires
        await until(lambda: len(engine.calls) == 1)
        assert engine.calls[0].rows == 2
        for v in (a, b):
            assert (await svc.wait("a", v.job.id, 10)).job.status is JobStatus.COMPLETED
        await svc.stop()

    run(body)


def test_a_full_batch_does_not_wait_for_the_delay() -> None:
    async def body() -> None:
        clock = FakeClock()  # never advanced: only a full batch can go
        engine = FakeEngine()
        svc = await start_service(engine, clock, max_queue_delay_ms=1000.0, max_batch_size=4)
        views = [await svc.submit("a", [f"j{i}"], GREEDY) for i in range(6)]
        await until(lambda: len(engine.calls) == 1)
        assert engine.calls[0].rows == 4
        await asyncio.sleep(0.05)
        assert len(engine.calls) == 1  # the other 2 wait for companions or the delay
        clock.advance(1.0)
        await until(lambda: len(engine.calls) == 2)
        assert engine.calls[1].rows == 2
        for v in views:
            assert (await svc.wait("a", v.job.id, 10)).job.status is JobStatus.COMPLETED
        await svc.stop()

    run(body)


def test_only_compatible_jobs_share_a_call() -> None:
    async def body() -> None:
        gate = threading.Event()
        engine = FakeEngine(gate=gate)
        svc = await start_service(engine)
        await svc.submit("a", ["blocker"], DecodingParams(max_new_tokens=2, num_beams=3))
        await until(engine.started.is_set)
        beam = DecodingParams(max_new_tokens=8, num_beams=2)
        sample = DecodingParams(max_new_tokens=8, do_sample=True, temperature=0.7)  # unseeded: batched
        order = [GREEDY, beam, GREEDY, sample, beam, GREEDY, DecodingParams(max_new_tokens=100)]
        views = [await svc.submit("a", [f"j{i}"], p) for i, p in enumerate(order)]
        gate.set()
        for v in views:
            assert (await svc.wait("a", v.job.id, 10)).job.status is JobStatus.COMPLETED
        # After the blocker: the head (greedy) takes the other greedy jobs of a similar length,
        # then beam, then sampling, then the 100-token greedy job that was too long to join.
        assert [c.max_new_tokens for c in engine.calls[1:]] == [(8, 8, 8), (8, 8), (8,), (100,)]
        await svc.stop()

    run(body)


def test_a_job_with_more_prompts_than_the_batch_is_split_into_calls() -> None:
    async def body() -> None:
        engine = FakeEngine()
        svc = await start_service(engine, max_batch_size=4)
        prompts = [f"prompt {i}" for i in range(10)]
        v = await svc.submit("a", prompts, GREEDY)
        done = await svc.wait("a", v.job.id, 10)
        assert [c.rows for c in engine.calls] == [4, 4, 2]
        assert done.job.result is not None
        assert [list(t) for t in done.job.result.token_ids] == [
            expected_tokens(fake_tokenize(p), 8) for p in prompts
        ]
        await svc.stop()

    run(body)


def test_one_bad_job_fails_alone_and_its_batch_neighbours_complete() -> None:
    async def body() -> None:
        def boom(requests: Sequence[GenerationRequest]) -> bool:
            return any(fake_tokenize("boom")[0] in r.input_ids for r in requests)

        engine = FakeEngine(fail_when=boom)
        svc = await start_service(engine, max_queue_delay_ms=100.0)
        views = await asyncio.gather(*(svc.submit("a", [p], GREEDY) for p in ("ok 1", "boom", "ok 2")))
        results = [await svc.wait("a", v.job.id, 10) for v in views]
        assert [r.job.status for r in results] == [JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.COMPLETED]
        err = results[1].job.error
        assert err is not None and err.code == "job_failed"
        assert "RuntimeError: fake engine failure" in err.message and "Traceback" not in err.message
        await svc.stop()

    run(body)


def test_contrastive_jobs_join_the_running_batch_between_steps() -> None:
    async def body() -> None:
        engine = FakeEngine(step_delay_s=0.01)
        svc = await start_service(engine, max_batch_size=3)
        long = DecodingParams(max_new_tokens=30, penalty_alpha=0.6, top_k=4)
        first = await svc.submit("a", ["first"], long)
        await until(lambda: len(engine.contrastive_steps) >= 3)
        later = [await svc.submit("a", [f"later {i}"], CONTRASTIVE) for i in range(3)]
        views = [first, *later]
        for v in views:
            done = await svc.wait("a", v.job.id, 10)
            assert done.job.result is not None
            n = v.job.params.max_new_tokens
            assert list(done.job.result.token_ids[0]) == expected_tokens(fake_tokenize(v.job.prompts[0]), n)
        steps = engine.contrastive_steps
        assert steps[0] == 1 and max(steps) == 3  # joined while "first" ran, bounded by max_batch_size
        assert engine.calls == []  # none went through the one-shot batch path
        await svc.stop()

    run(body)


@pytest.mark.parametrize(
    ("engine_says", "greedy_lane", "continuous"),
    [
        (True, "auto", True),
        (False, "auto", False),
        (False, "continuous", True),
        (True, "batch", False),
    ],
)
def test_greedy_runs_on_the_lane_the_config_and_the_engine_choose(
    engine_says: bool, greedy_lane: str, continuous: bool
) -> None:
    """greedy_lane=auto follows the engine's measured choice; continuous and batch override it.
    Beam search stays on the batch lane whatever greedy does."""

    async def body() -> None:
        engine = FakeEngine(greedy_continuous=engine_says)
        svc = await start_service(engine, greedy_lane=greedy_lane)
        greedy = await svc.submit("a", ["g"], GREEDY)
        beam = await svc.submit("a", ["b"], DecodingParams(max_new_tokens=8, num_beams=2))
        for view in (greedy, beam):
            assert (await svc.wait("a", view.job.id, 10)).job.status is JobStatus.COMPLETED
        assert bool(engine.contrastive_steps) is continuous  # our decoder's batch ran greedy
        assert [c.rows for c in engine.calls] == ([1] if continuous else [1, 1])  # beam, [greedy]
        await svc.stop()

    run(body)


def test_a_short_greedy_job_on_the_continuous_lane_does_not_wait_for_a_long_one() -> None:
    """Rows join and leave between steps: a 4-token job sent while a 400-token job runs finishes
    within a few steps of joining, not after the long job's 400."""

    async def body() -> None:
        engine = FakeEngine(step_delay_s=0.005, greedy_continuous=True)
        svc = await start_service(engine)
        long = await svc.submit("a", ["long"], DecodingParams(max_new_tokens=400, min_new_tokens=400))
        await until(lambda: len(engine.contrastive_steps) >= 3)
        short = await svc.submit("a", ["short"], DecodingParams(max_new_tokens=4, min_new_tokens=4))
        joined_at = len(engine.contrastive_steps)
        done = await svc.wait("a", short.job.id, 10)
        assert done.job.status is JobStatus.COMPLETED
        assert done.job.result is not None and len(done.job.result.token_ids[0]) == 4
        assert len(engine.contrastive_steps) <= joined_at + 4 + 2  # its 4 steps, give or take one
        assert (await svc.get("a", long.job.id)).job.status is JobStatus.RUNNING
        assert max(engine.contrastive_steps) == 2  # they shared the steps
        assert engine.calls == []
        await svc.cancel("a", long.job.id)
        await svc.stop()

    run(body)


def test_the_continuous_loop_reads_the_queue_on_wakeups_freed_rows_and_a_poll_not_every_step() -> None:
    """A long job alone: the queue is read a few times (the poll every ADMIT_POLL_S of the clock),
    not once per step; a submit still joins within a step or two."""

    class CountingStore(SqliteJobStore):
        reads = 0

        def queued(self, lane: Lane, limit: int, batch_key: str | None = None) -> list[QueueEntry]:
            if lane is Lane.DECODER:
                CountingStore.reads += 1
            return super().queued(lane, limit, batch_key)

    async def body() -> None:
        clock = FakeClock()
        engine = FakeEngine(step_delay_s=0.0005, greedy_continuous=True)
        svc = await start_service(engine, clock=clock, store=CountingStore(":memory:"))
        long = await svc.submit("a", ["long"], DecodingParams(max_new_tokens=4000, min_new_tokens=4000))
        await until(lambda: len(engine.contrastive_steps) >= 100)
        assert CountingStore.reads <= 3  # the clock stood still: no poll came due
        clock.advance(ADMIT_POLL_S)
        before = CountingStore.reads
        await until(lambda: CountingStore.reads > before)  # the poll came due: one read
        short = await svc.submit("a", ["short"], DecodingParams(max_new_tokens=3, min_new_tokens=3))
        at = len(engine.contrastive_steps)
        assert (await svc.wait("a", short.job.id, 10)).job.status is JobStatus.COMPLETED
        assert len(engine.contrastive_steps) <= at + 5
        assert (await svc.get("a", long.job.id)).job.status is JobStatus.RUNNING
        assert CountingStore.reads <= 8
        await svc.cancel("a", long.job.id)
        await svc.stop()

    run(body)


def test_unwatched_steps_chain_on_the_worker_and_a_watched_job_sees_every_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Nobody watches the job: the worker runs many steps per return to the event loop. Once a
    stream watches it, every step comes back (its tokens are published as they come). The chain's
    wall-clock cap (CHAIN_S) is lifted and the clock stands still (no queue poll comes due), so
    the count does not depend on how fast this machine runs the steps."""
    monkeypatch.setattr(continuous_loop, "CHAIN_S", 60.0)

    async def body() -> None:
        engine = FakeEngine(step_delay_s=0.0005, greedy_continuous=True)
        svc = await start_service(engine, clock=FakeClock())
        loop = svc._scheduler.continuous_loop  # type: ignore[union-attr]
        returns = 0
        update = loop.update

        def counted(output: Any) -> None:
            nonlocal returns
            returns += 1
            update(output)

        loop.update = counted  # type: ignore[method-assign]
        job = await svc.submit("a", ["unwatched"], DecodingParams(max_new_tokens=300, min_new_tokens=300))
        assert (await svc.wait("a", job.job.id, 20)).job.status is JobStatus.COMPLETED
        assert returns <= 10, returns  # the first token, the end, and little else: 300 steps
        watched = await svc.submit("a", ["watched"], DecodingParams(max_new_tokens=60, min_new_tokens=60))
        steps_before, returns = len(engine.contrastive_steps), 0
        tokens = [ev async for ev in svc.stream("a", watched.job.id)]
        assert len(tokens) >= 60
        assert returns >= len(engine.contrastive_steps) - steps_before - 2  # one return a step
        await svc.stop()

    run(body)


def test_a_cancelled_contrastive_job_leaves_at_the_next_step() -> None:
    async def body() -> None:
        engine = FakeEngine(step_delay_s=0.01)
        svc = await start_service(engine)
        long = DecodingParams(max_new_tokens=200, penalty_alpha=0.6, top_k=4)
        a = await svc.submit("a", ["a"], long)
        b = await svc.submit("a", ["b"], DecodingParams(max_new_tokens=40, penalty_alpha=0.6, top_k=4))
        await until(lambda: len(engine.contrastive_steps) >= 2)
        assert (await svc.cancel("a", a.job.id)).job.status is JobStatus.CANCELLED
        steps_at_cancel = len(engine.contrastive_steps)
        done = await svc.wait("a", b.job.id, 10)
        assert done.job.status is JobStatus.COMPLETED
        await until(lambda: engine.contrastive_steps[-1] <= 1)
        # Within two steps of the cancel the batch is down to "b" alone.
        assert all(rows == 1 for rows in engine.contrastive_steps[steps_at_cancel + 2 :])
        assert len(engine.contrastive_steps) < 100
        await svc.stop()

    run(body)


def test_one_engine_call_at_a_time_across_both_loops() -> None:
    async def body() -> None:
        engine = FakeEngine(step_delay_s=0.001)
        svc = await start_service(engine, max_batch_size=4)
        views = []
        for i in range(12):
            params = CONTRASTIVE if i % 2 else DecodingParams(max_new_tokens=8 + i)
            views.append(await svc.submit("a", [f"m{i}"], params))
        for v in views:
            assert (await svc.wait("a", v.job.id, 10)).job.status is JobStatus.COMPLETED
        assert engine.concurrent_calls_seen == 1
        assert engine.calls and engine.contrastive_steps
        await svc.stop()

    run(body)


def test_jobs_left_running_by_a_dead_process_are_run_again_on_start() -> None:
    async def body() -> None:
        from engine.serving.jobs import Job
        from engine.serving.store.sqlite import SqliteJobStore

        store = SqliteJobStore(":memory:")
        for i in range(3):
            store.enqueue(submission(Job(id=f"j{i}", owner="a", prompts=(f"p{i}",), params=GREEDY), 2))
        store.claim(["j0", "j1"], 1.0)  # running in a process that then died
        svc = await start_service(store=store)
        for i in range(3):
            done = await svc.wait("a", f"j{i}", 10)
            assert done.job.status is JobStatus.COMPLETED
            assert done.job.attempts == (2 if i < 2 else 1)
            assert done.job.result is not None
            assert list(done.job.result.token_ids[0]) == expected_tokens(fake_tokenize(f"p{i}"), 8)
        await svc.stop()

    run(body)


def test_contrastive_rows_wait_for_room_in_the_decoder_and_refused_jobs_fail_alone() -> None:
    async def body() -> None:
        engine = FakeEngine(step_delay_s=0.002, contrastive_max_rows=2)
        svc = await start_service(engine, max_batch_size=8)
        views = [await svc.submit("a", [f"c{i}"], CONTRASTIVE) for i in range(5)]
        refused = await svc.submit("a", ["please reject me", "fine"], CONTRASTIVE)
        for v in views:
            done = await svc.wait("a", v.job.id, 10)
            assert done.job.status is JobStatus.COMPLETED
            assert done.job.result is not None
            assert list(done.job.result.token_ids[0]) == expected_tokens(fake_tokenize(v.job.prompts[0]), 8)
        bad = await svc.wait("a", refused.job.id, 10)
        assert bad.job.status is JobStatus.FAILED
        assert bad.job.error is not None and "refuses this request" in bad.job.error.message
        assert max(engine.contrastive_steps) == 2
        await svc.stop()

    run(body)


def test_the_loops_survive_a_store_outage() -> None:
    from engine.errors import NotReady
    from engine.serving.store.sqlite import SqliteJobStore

    class FlakyStore(SqliteJobStore):
        failures = 2

        def queued(self, lane: Lane, limit: int, batch_key: str | None = None) -> list[QueueEntry]:
            if self.failures:
                self.failures -= 1
                raise NotReady("the job store is down (test)")
            return super().queued(lane, limit, batch_key)

    async def body() -> None:
        clock = FakeClock()
        store = FlakyStore(":memory:")
        svc = await start_service(store=store, clock=clock)
        v = await svc.submit("a", ["x"], GREEDY)
        c = await svc.submit("a", ["y"], CONTRASTIVE)
        await until(lambda: store.failures == 0)
        await asyncio.sleep(0.02)
        clock.advance(1.0)  # the loops' restart delay
        for job in (v, c):
            assert (await svc.wait("a", job.job.id, 10)).job.status is JobStatus.COMPLETED
        await svc.stop()

    run(body)


def test_the_engine_worker_runs_calls_in_order_on_its_own_thread() -> None:
    import pytest

    from engine.serving.worker import EngineWorker

    async def body() -> None:
        worker = EngineWorker()
        main = threading.get_ident()
        seen: list[int] = []

        def call(n: int) -> int:
            assert threading.get_ident() != main
            seen.append(n)
            return n * n

        assert await asyncio.gather(*(worker.run(call, n) for n in range(5))) == [0, 1, 4, 9, 16]
        assert seen == [0, 1, 2, 3, 4]

        def boom() -> None:
            raise ValueError("engine said no")

        with pytest.raises(ValueError, match="engine said no"):
            await worker.run(boom)
        assert await worker.run(call, 6) == 36  # still serving after a failure
        worker.stop()
        with pytest.raises(RuntimeError, match="stopped"):
            await worker.run(call, 7)
        await until(lambda: not worker.alive)

    run(body)


@pytest.mark.parametrize("greedy_lane", ["batch", "continuous"])
def test_the_real_engine_through_the_scheduler_gives_the_engines_own_ids(
    flan_model_dir: Path, greedy_lane: str
) -> None:
    """Greedy (mixed lengths, with and without processors) on either lane, continuous contrastive
    and seeded sampling through JobService, on a tiny converted model, against the same engine
    called directly one prompt at a time."""
    from engine.runtime.engine import Engine

    engine = Engine(flan_model_dir, compute_type="float32", intra_threads=1)
    prompts = ["ka bo zu", "pe mi lo tifudo", "kebupi ro", "vu se da ga no", "ka ka bo"]
    cases = [
        *((p, DecodingParams(max_new_tokens=6 + i)) for i, p in enumerate(prompts)),
        (prompts[1], DecodingParams(max_new_tokens=9, repetition_penalty=1.3, no_repeat_ngram_size=2)),
        *((p, DecodingParams(max_new_tokens=5, penalty_alpha=0.6, top_k=3)) for p in prompts[:3]),
        *(
            (p, DecodingParams(max_new_tokens=7, do_sample=True, temperature=1.5, seed=40 + i))
            for i, p in enumerate(prompts[:3])
        ),
    ]

    async def body() -> None:
        svc = await start_service(engine, max_queue_delay_ms=50.0, greedy_lane=greedy_lane)
        views = await asyncio.gather(*(svc.submit("a", [p], params) for p, params in cases))
        for (prompt, params), view in zip(cases, views, strict=True):
            done = await svc.wait("a", view.job.id, 60)
            assert done.job.status is JobStatus.COMPLETED, done.job.error
            [alone] = engine.generate([prompt], **params.to_dict())
            assert done.job.result is not None
            assert done.job.result.token_ids[0] == alone.token_ids
            assert done.job.result.completion[0] == alone.text
        await svc.stop()

    run(body)


def test_a_contrastive_job_needing_more_rows_than_the_decoder_has_joins_as_rows_free_up(
    flan_model_dir: Path,
) -> None:
    """32 prompts at top_k 50 need 1,600 decoder rows; the decoder has 256 (5 prompts at a time).
    The job is accepted and completes: its prompts wait for room instead of failing the job."""
    from engine.limits import MAX_TOP_K
    from engine.runtime.decoder_batch import DEFAULT_MAX_ROWS
    from engine.runtime.engine import Engine

    # No single prompt can need more rows than the decoder has, so admission never has to
    # refuse one at submit; raising MAX_TOP_K past the decoder's rows would need that check.
    assert MAX_TOP_K <= DEFAULT_MAX_ROWS

    engine = Engine(flan_model_dir, compute_type="float32", intra_threads=1)
    sizes: list[int] = []  # requests in the decoder at each step

    class WatchedBatch:
        def __init__(self, inner: DecoderBatchLike) -> None:
            self.inner = inner

        def add(self, request_id: str, request: GenerationRequest) -> None:
            self.inner.add(request_id, request)

        def cancel(self, request_id: str) -> None:
            self.inner.cancel(request_id)

        def step(self) -> list[TokenEvent]:
            sizes.append(len(self.inner))
            return self.inner.step()

        def __len__(self) -> int:
            return len(self.inner)

    class Watched:
        manifest = engine.manifest
        tokenize = staticmethod(engine.tokenize)
        generate_requests = staticmethod(engine.generate_requests)
        greedy_continuous = staticmethod(engine.greedy_continuous)

        def decoder_batch(self) -> WatchedBatch:
            return WatchedBatch(engine.decoder_batch())

    watched = Watched()
    params = DecodingParams(max_new_tokens=3, penalty_alpha=0.6, top_k=50)
    prompts = [f"ka bo {i} zu" for i in range(32)]

    async def body() -> None:
        svc = await start_service(watched, max_prompts_per_request=64)
        view = await svc.submit("a", prompts, params)
        done = await svc.wait("a", view.job.id, 60)
        assert done.job.status is JobStatus.COMPLETED, done.job.error
        assert done.job.result is not None and len(done.job.result.token_ids) == 32
        for i in (0, 5, 31):  # in the first group, the first to wait for room, the last
            [alone] = engine.generate([prompts[i]], **params.to_dict())
            assert done.job.result.token_ids[i] == alone.token_ids
        await svc.stop()

    run(body)
    assert max(sizes) == DEFAULT_MAX_ROWS // 50  # the decoder was full, never over-full
    assert sum(1 for s in sizes if s) >= 32 // (DEFAULT_MAX_ROWS // 50) * 3  # several rounds of joins
