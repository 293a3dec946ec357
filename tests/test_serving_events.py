"""Token events on their way to streams: only watched jobs wake the event loop, and a stream that
starts late still replays every token from the first."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from engine.runtime.params import DecodingParams
from engine.serving.events import JobEvents, Row, RowEvent, TokenForwarder
from harness.fakes import FakeEngine, expected_tokens, fake_tokenize, start_service, until


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(test())


def queued_token_ids(q: asyncio.Queue[RowEvent | None]) -> list[int]:
    """Drain what the queue holds now: token events only (None would be the end of the stream)."""
    ids = []
    for _ in range(q.qsize()):
        ev = q.get_nowait()
        assert ev is not None, "the stream ended early"
        ids.append(ev.token_id)
    return ids


class CountingLoop:
    """Stands in for the event loop on the engine's side: counts the wake-ups it is asked for."""

    def __init__(self) -> None:
        self.wakeups: list[Callable[[], Any]] = []

    def call_soon_threadsafe(self, callback: Callable[[], Any]) -> None:
        self.wakeups.append(callback)


def test_unwatched_tokens_never_wake_the_loop_and_are_dropped_at_the_end_of_the_call() -> None:
    async def body() -> None:
        events = JobEvents()
        loop = CountingLoop()
        fwd = TokenForwarder(loop, events)  # type: ignore[arg-type]
        for step in range(50):
            fwd.push(Row("quiet", 0), step)
        assert loop.wakeups == []
        fwd.drop_unwatched()
        q = events.subscribe("quiet")  # nothing was published for it: nothing to replay
        assert q.empty()

    run(body)


def test_a_watched_job_wakes_the_loop_once_per_flush_and_gets_every_token_in_order() -> None:
    async def body() -> None:
        events = JobEvents()
        loop = CountingLoop()
        fwd = TokenForwarder(loop, events)  # type: ignore[arg-type]
        fwd.push(Row("w", 0), 10)  # before anyone watches: held back
        fwd.push(Row("other", 0), 99)
        assert loop.wakeups == []
        q = events.subscribe("w")  # drains what was held back, then replays it
        assert queued_token_ids(q) == [10]
        for token in (11, 12, 13):
            fwd.push(Row("w", 0), token)
        assert len(loop.wakeups) == 1  # coalesced: one flush per loop iteration
        loop.wakeups.pop()()
        assert queued_token_ids(q) == [11, 12, 13]
        fwd.push(Row("w", 0), 14)
        fwd.push(Row("other", 0), 100)
        fwd.drop_unwatched()  # the call ended before the scheduled flush ran: nothing is lost
        assert queued_token_ids(q) == [14]
        loop.wakeups.pop()()  # the late flush finds nothing more
        assert q.empty()
        events.unsubscribe("w", q)
        assert "w" not in events.watched

    run(body)


def test_a_stream_that_starts_mid_job_still_gets_every_token_from_the_first() -> None:
    async def body() -> None:
        engine = FakeEngine(step_delay_s=0.01)
        svc = await start_service(engine)
        v = await svc.submit("a", ["late subscriber"], DecodingParams(max_new_tokens=30, min_new_tokens=30))
        await until(engine.started.is_set)
        await asyncio.sleep(0.08)  # several tokens generated with nobody watching
        got = [ev async for ev in svc.stream("a", v.job.id)]
        want = expected_tokens(fake_tokenize("late subscriber"), 30)
        assert [ev.token_id for ev in got[:-1]] == want
        final = got[-1].result
        assert final is not None and list(final.token_ids) == want
        assert not svc.events.watched
        await svc.stop()

    run(body)
