"""JobService: validation, positions, cancel, overload, timeouts, TTL purge, wait, stream, shutdown."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import ClassVar

import pytest

from engine.config import Config
from engine.errors import InvalidRequest, NotFound, NotReady, Overloaded, PromptTooLong
from engine.metrics import Metrics
from engine.runtime.params import DecodingParams
from engine.runtime.result import FinishReason
from engine.serving.clock import FakeClock
from engine.serving.events import Row
from engine.serving.jobs import JobStatus
from engine.serving.service import JobService
from engine.serving.store.sqlite import SqliteJobStore
from harness.fakes import FakeEngine, expected_tokens, fake_text, fake_tokenize, start_service, until

P8 = DecodingParams(max_new_tokens=8)


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), timeout=60))


def test_a_job_runs_and_its_result_is_exact() -> None:
    async def body() -> None:
        svc = await start_service()
        view = await svc.submit("alice", ["translate this", "and eos:2 this"], P8)
        assert view.job.status is JobStatus.QUEUED and view.queue_position == 0
        done = await svc.wait("alice", view.job.id, timeout_s=10)
        assert done.job.status is JobStatus.COMPLETED and done.job.attempts == 1
        res = done.job.result
        assert res is not None
        want = [expected_tokens(fake_tokenize(p), 8) for p in view.job.prompts]
        assert [list(t) for t in res.token_ids] == want
        assert len(want[1]) == 2
        assert res.completion == tuple(fake_text(t) for t in want)
        assert res.finish_reasons == ("length", "eos")
        assert res.usage.prompt_tokens == 3 + 4 and res.usage.completion_tokens == 10
        await svc.stop()

    run(body)


def test_submit_rejects_bad_requests_with_clear_messages() -> None:
    async def body() -> None:
        svc = await start_service(
            max_prompts_per_request=3, max_new_tokens_limit=16, model_dir="/m/flan-small"
        )
        with pytest.raises(InvalidRequest, match="non-empty list"):
            await svc.submit("a", [], P8)
        with pytest.raises(InvalidRequest, match=r"prompt\(s\) \[1\] are not"):
            await svc.submit("a", ["x", 5], P8)  # type: ignore[list-item]
        with pytest.raises(InvalidRequest, match="list of strings"):
            await svc.submit("a", "just a string", P8)
        with pytest.raises(PromptTooLong, match="prompt 1 has 71 tokens, 7 more than"):
            await svc.submit("a", ["ok", "w " * 70], P8)
        # The limits (prompt count, max_new_tokens) and the model name are checked once, at the
        # edge: tests/test_api_edge.py.
        ok = await svc.submit("a", ["x"], P8, model="flan-small")
        assert ok.job.model == "flan-small"
        assert (
            svc.store.queue_depth()
            + svc.store.count(JobStatus.RUNNING)
            + svc.store.count(JobStatus.COMPLETED)
            == 1
        )  # nothing rejected was stored
        await svc.stop()

    run(body)


def test_not_ready_before_start_and_after_stop() -> None:
    async def body() -> None:
        svc = JobService(Config(), SqliteJobStore(":memory:"), FakeEngine())
        assert not svc.ready
        with pytest.raises(NotReady, match="starting"):
            await svc.submit("a", ["x"], P8)
        await svc.start()
        assert svc.ready
        await svc.stop()
        assert not svc.ready
        with pytest.raises(NotReady, match="shutting down"):
            await svc.submit("a", ["x"], P8)

    run(body)


def test_other_owners_and_unknown_ids_are_not_found() -> None:
    async def body() -> None:
        svc = await start_service()
        view = await svc.submit("alice", ["x"], P8)
        for call in (svc.get, svc.cancel, svc.wait):
            with pytest.raises(NotFound, match="no job"):
                await call("mallory", view.job.id)
            with pytest.raises(NotFound, match="no job"):
                await call("alice", "0" * 32)
        with pytest.raises(NotFound):
            async for _ in svc.stream("mallory", view.job.id):
                pass
        await svc.stop()

    run(body)


def test_queue_positions_while_the_engine_is_busy() -> None:
    async def body() -> None:
        gate = threading.Event()
        engine = FakeEngine(gate=gate)
        svc = await start_service(engine)
        first = await svc.submit("a", ["first"], P8)
        await until(engine.started.is_set)  # "first" is running, held at the gate
        beam = DecodingParams(num_beams=2, max_new_tokens=8)  # another batch key: no joining
        views = [await svc.submit("a", [f"q{i}"], beam) for i in range(4)]
        assert [v.queue_position for v in views] == [0, 1, 2, 3]
        assert (await svc.get("a", first.job.id)).queue_position == 0
        assert (await svc.get("a", first.job.id)).job.status is JobStatus.RUNNING
        cancelled = await svc.cancel("a", views[1].job.id)
        assert cancelled.job.status is JobStatus.CANCELLED
        assert [(await svc.get("a", v.job.id)).queue_position for v in views[2:]] == [1, 2]
        assert svc.queue_depth() == 3
        gate.set()
        for v in (first, views[0], views[2], views[3]):
            assert (await svc.wait("a", v.job.id, 10)).job.status is JobStatus.COMPLETED
        assert (await svc.get("a", views[1].job.id)).job.status is JobStatus.CANCELLED
        assert svc.queue_depth() == 0
        await svc.stop()

    run(body)


def test_overload_past_max_queue_size_with_retry_after() -> None:
    async def body() -> None:
        gate = threading.Event()
        engine = FakeEngine(gate=gate)
        svc = await start_service(engine, max_queue_size=2)
        await svc.submit("a", ["running"], P8)
        await until(engine.started.is_set)
        beam = DecodingParams(num_beams=2, max_new_tokens=8)
        await svc.submit("a", ["q1"], beam)
        await svc.submit("a", ["q2"], beam)
        with pytest.raises(Overloaded, match=r"queue is full \(2 jobs waiting, max_queue_size 2\)") as info:
            await svc.submit("a", ["q3"], beam)
        assert 1.0 <= info.value.retry_after_s <= 60.0
        gate.set()
        await until(lambda: svc.queue_depth() == 0)
        await svc.submit("a", ["q3"], beam)  # room again
        await svc.stop()

    run(body)


def test_cancel_a_running_job_stops_its_rows_and_spares_its_neighbours() -> None:
    async def body() -> None:
        engine = FakeEngine(step_delay_s=0.01)
        svc = await start_service(engine, max_queue_delay_ms=50.0)
        long = DecodingParams(max_new_tokens=60)
        a = await svc.submit("a", ["a"], long)
        b = await svc.submit("a", ["b"], long)
        stream = svc.stream("a", a.job.id)
        first = await anext(stream)  # "a" is generating
        assert first.row == Row(a.job.id, 0)
        cancelled = await svc.cancel("a", a.job.id)
        assert cancelled.job.status is JobStatus.CANCELLED
        rest = [ev async for ev in stream]  # the stream ends without a result for "a"
        assert all(ev.result is None for ev in rest)
        done = await svc.wait("a", b.job.id, 10)
        assert done.job.status is JobStatus.COMPLETED
        assert done.job.result is not None and len(done.job.result.token_ids[0]) == 60
        final = await svc.get("a", a.job.id)
        assert final.job.status is JobStatus.CANCELLED and final.job.result is None
        assert engine.calls[0].rows == 2
        assert engine.calls[0].finish_reasons == (FinishReason.CANCELLED, FinishReason.LENGTH)
        await svc.stop()

    run(body)


def test_cancel_a_finished_job_changes_nothing() -> None:
    async def body() -> None:
        svc = await start_service()
        v = await svc.submit("a", ["x"], P8)
        await svc.wait("a", v.job.id, 10)
        again = await svc.cancel("a", v.job.id)
        assert again.job.status is JobStatus.COMPLETED
        await svc.stop()

    run(body)


def test_job_timeout_fails_queued_and_running_jobs_with_the_reason() -> None:
    async def body() -> None:
        clock = FakeClock()
        gate = threading.Event()
        engine = FakeEngine(gate=gate)
        metrics = Metrics()
        svc = await start_service(engine, clock, metrics=metrics, job_timeout_s=10.0)
        running = await svc.submit("a", ["r"], P8)
        await until(engine.started.is_set)
        queued = await svc.submit("a", ["q"], DecodingParams(num_beams=2, max_new_tokens=8))
        clock.advance(5.0)
        await asyncio.sleep(0.05)
        assert (await svc.get("a", queued.job.id)).job.status is JobStatus.QUEUED
        clock.advance(6.0)
        await until(lambda: svc.store.count(JobStatus.FAILED) == 2)
        q = (await svc.get("a", queued.job.id)).job
        r = (await svc.get("a", running.job.id)).job
        assert q.error is not None and q.error.code == "timeout"
        assert "job_timeout_s=10 s" in q.error.message and "still queued" in q.error.message
        assert r.error is not None and r.error.code == "timeout" and "still running" in r.error.message
        gate.set()  # the engine's late result for the running job is dropped
        await until(lambda: not svc._scheduler.running)  # type: ignore[union-attr]
        assert (await svc.get("a", running.job.id)).job.status is JobStatus.FAILED
        assert metrics.jobs.labels(status="failed", finish_reason="")._value.get() == 2
        await svc.stop()

    run(body)


def test_results_are_purged_after_the_ttl() -> None:
    async def body() -> None:
        clock = FakeClock()
        svc = await start_service(clock=clock, result_ttl_s=100.0)
        v = await svc.submit("a", ["x"], P8)
        await until(lambda: svc.store.count(JobStatus.COMPLETED) == 1)
        clock.advance(50.0)
        await asyncio.sleep(0.02)
        assert (await svc.get("a", v.job.id)).job.status is JobStatus.COMPLETED
        for _ in range(10):  # the purge runs every ttl/10 s of clock time
            clock.advance(10.0)
            await asyncio.sleep(0.01)
        await until(lambda: svc.store.get(v.job.id) is None)
        with pytest.raises(NotFound):
            await svc.get("a", v.job.id)
        await svc.stop()

    run(body)


def test_wait_with_a_timeout_returns_the_job_as_it_is() -> None:
    async def body() -> None:
        gate = threading.Event()
        svc = await start_service(FakeEngine(gate=gate))
        v = await svc.submit("a", ["x"], P8)
        still = await svc.wait("a", v.job.id, timeout_s=0.05)
        assert not still.job.status.terminal
        gate.set()
        assert (await svc.wait("a", v.job.id)).job.status is JobStatus.COMPLETED
        await svc.stop()

    run(body)


def test_a_batch_completes_in_one_store_call_and_waiters_answer_without_reading_it_back() -> None:
    """What the REST long poll relies on: the jobs a batch finished are stored together, and a
    waiter gets the job exactly as it was stored, without another read of the store."""

    class CountingStore(SqliteJobStore):
        gets = 0
        batches: ClassVar[list[int]] = []

        def get(self, job_id: str):  # type: ignore[no-untyped-def]
            self.gets += 1
            return super().get(job_id)

        def complete_many(self, completions, now):  # type: ignore[no-untyped-def]
            self.batches.append(len(completions))
            return super().complete_many(completions, now)

    async def body() -> None:
        gate = threading.Event()
        store = CountingStore(":memory:")
        svc = await start_service(FakeEngine(gate=gate), store=store, max_queue_delay_ms=50.0)
        views = await asyncio.gather(*(svc.submit("a", [f"p{i}"], P8) for i in range(5)))
        waits = [asyncio.ensure_future(svc.wait("a", v.job.id, 10)) for v in views]
        await asyncio.sleep(0.1)
        gets_before = store.gets
        gate.set()
        done = await asyncio.gather(*waits)
        assert store.gets == gets_before  # no read back once the batch ended
        assert store.batches == [5]
        for view in done:
            stored = store.get(view.job.id)
            assert view.job == stored and view.job.status is JobStatus.COMPLETED
            assert view.queue_position == 0
        await svc.stop()

    run(body)


def test_stream_yields_tokens_then_results_and_replays_a_finished_job() -> None:
    async def body() -> None:
        svc = await start_service(FakeEngine(step_delay_s=0.002))
        v = await svc.submit("a", ["one two", "three eos:3"], DecodingParams(max_new_tokens=6))
        events = [ev async for ev in svc.stream("a", v.job.id)]
        want = [expected_tokens(fake_tokenize(p), 6) for p in v.job.prompts]
        for i in range(2):
            mine = [ev for ev in events if ev.row == Row(v.job.id, i)]
            assert [ev.token_id for ev in mine[:-1]] == want[i]
            last = mine[-1]
            assert last.token_id == -1 and last.result is not None
            assert list(last.result.token_ids) == want[i]
        replay = [ev async for ev in svc.stream("a", v.job.id)]
        assert replay == [ev for ev in events if ev.result is not None]
        assert replay[1].result is not None and replay[1].result.finish_reason is FinishReason.EOS
        await svc.stop()

    run(body)


def test_graceful_stop_finishes_the_running_batch_and_keeps_the_queue(tmp_path: Path) -> None:
    async def body() -> None:
        db = tmp_path / "engine.db"
        engine = FakeEngine(step_delay_s=0.005)
        svc = await start_service(engine, store=SqliteJobStore(db))
        running = await svc.submit("a", ["r"], DecodingParams(max_new_tokens=20))
        await until(engine.started.is_set)
        queued = await svc.submit("a", ["q"], DecodingParams(num_beams=2, max_new_tokens=8))
        await svc.stop(drain_timeout_s=10)
        store = SqliteJobStore(db)
        r, q = store.get(running.job.id), store.get(queued.job.id)
        assert r is not None and r.status is JobStatus.COMPLETED
        assert q is not None and q.status is JobStatus.QUEUED and q.attempts == 0
        store.close()

    run(body)


def test_stop_past_the_drain_timeout_requeues_the_running_job(tmp_path: Path) -> None:
    async def body() -> None:
        db = tmp_path / "engine.db"
        engine = FakeEngine(step_delay_s=0.01)
        svc = await start_service(engine, store=SqliteJobStore(db))
        running = await svc.submit("a", ["r"], DecodingParams(max_new_tokens=500))
        await until(engine.started.is_set)
        await svc.stop(drain_timeout_s=0.1)
        assert engine.calls and engine.calls[0].steps < 500  # it left the engine early
        store = SqliteJobStore(db)
        r = store.get(running.job.id)
        assert r is not None and r.status is JobStatus.QUEUED and r.attempts == 1
        store.close()
        # The next process takes it up again and completes it.
        svc2 = await start_service(FakeEngine(), store=SqliteJobStore(db))
        done = await svc2.wait("a", running.job.id, 10)
        assert done.job.status is JobStatus.COMPLETED and done.job.attempts == 2
        assert done.job.result is not None and len(done.job.result.token_ids[0]) == 500
        await svc2.stop()

    run(body)


def test_metrics_are_observed() -> None:
    async def body() -> None:
        metrics = Metrics()
        svc = await start_service(metrics=metrics)
        views = [await svc.submit("a", ["x y", "z"], P8) for _ in range(3)]
        for v in views:
            await svc.wait("a", v.job.id, 10)
        text = metrics.render().decode()
        assert 'engine_jobs_total{finish_reason="length",status="completed"} 3.0' in text
        assert "engine_time_to_first_token_seconds_count 3.0" in text
        assert "engine_prompt_length_tokens_count 6.0" in text
        assert "engine_generation_length_tokens_sum 48.0" in text
        assert "engine_generated_tokens_total 48.0" in text
        assert "engine_prompt_tokens_total 15.0" in text
        assert "engine_queue_depth 0.0" in text
        assert "engine_jobs_running 0.0" in text
        for name in (
            "engine_batch_size_count",
            "engine_inference_seconds_count",
            "engine_queue_wait_seconds_count 3.0",
            "engine_request_latency_seconds_count 3.0",
            "engine_time_per_output_token_seconds_count 3.0",
        ):
            assert name in text
        await svc.stop()

    run(body)
