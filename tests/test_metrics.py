"""engine_queue_depth is read from the job store when /metrics is scraped: not on every submit,
claim or cancel, at most once a second on a shared store, and a store that does not answer
leaves the last value instead of breaking the scrape."""

from __future__ import annotations

import asyncio
import math
import re
import threading

import pytest

from engine.errors import NotReady
from engine.metrics import CachedRead, Metrics
from engine.runtime.params import DecodingParams
from engine.serving.store.sqlite import SqliteJobStore
from harness.fakes import FakeEngine, start_service, until


def depth(metrics: Metrics) -> float:
    match = re.search(r"^engine_queue_depth (\S+)$", metrics.render().decode(), re.M)
    assert match is not None
    return float(match.group(1))


class CountingStore(SqliteJobStore):
    depth_reads = 0

    def queue_depth(self) -> int:
        self.depth_reads += 1
        return super().queue_depth()


def test_metrics_show_the_current_depth_without_a_store_read_per_submit() -> None:
    async def body() -> None:
        gate = threading.Event()
        store = CountingStore(":memory:")
        metrics = Metrics()
        svc = await start_service(FakeEngine(gate=gate), store=store, metrics=metrics, max_batch_size=1)
        reads = store.depth_reads
        views = [await svc.submit("a", [f"p{i}"], DecodingParams(max_new_tokens=2)) for i in range(6)]
        await svc.cancel("a", views[5].job.id)
        assert store.depth_reads == reads  # no read for the submits, the claims or the cancel
        await until(lambda: bool(svc._scheduler and svc._scheduler.running))  # the engine holds one
        scraped = depth(metrics)
        assert store.depth_reads == reads + 1  # read once, by the scrape
        assert scraped == SqliteJobStore.queue_depth(store) and 0 < scraped < 5
        gate.set()
        await until(lambda: svc.queue_depth() == 0)
        assert depth(metrics) == 0.0
        await svc.stop()

    asyncio.run(asyncio.wait_for(body(), 30))


def test_a_shared_stores_depth_is_read_at_most_once_per_max_age() -> None:
    values = iter(range(100))
    now = [100.0]
    read = CachedRead(lambda: next(values), max_age_s=1.0, clock=lambda: now[0])
    assert read() == 0.0
    now[0] += 0.5
    assert read() == 0.0  # still fresh: no read
    now[0] += 0.5
    assert read() == 1.0
    assert CachedRead(lambda: next(values), max_age_s=0.0, clock=lambda: now[0])() == 2.0


def test_a_store_that_does_not_answer_leaves_the_last_depth() -> None:
    answers: list[int | Exception] = [NotReady("down"), 7, NotReady("down")]

    def read() -> int:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    metrics = Metrics()
    metrics.watch_queue_depth(read)
    assert math.isnan(depth(metrics))  # nothing read yet
    assert depth(metrics) == 7.0
    assert depth(metrics) == 7.0  # down again: the last value, and the scrape still renders


def test_other_errors_are_not_hidden() -> None:
    def read() -> int:
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError):
        CachedRead(read, max_age_s=0.0)()
