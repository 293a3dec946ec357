"""Token events on their way from the engine's worker thread to ``JobService.stream``.

A job's prompt is a row of the engine; its events are ``RowEvent``s keyed by a typed ``Row``
(job id, prompt index), never by a string that a reader has to parse. ``TokenForwarder`` collects
them on the worker thread and hands them to the event loop in coalesced flushes; ``JobEvents``
keeps, per running job, a replay buffer, the subscribers' queues and the waiters for its end.

The publishing interface is three calls: ``TokenForwarder.push(row, token_id)`` from the engine's
threads, ``JobEvents.publish(row, token_id)`` from the event loop, and ``JobEvents.finish(job_id,
final_events(...), job)`` when a job ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from engine.runtime.result import FinishReason, Result, TokenLogprob, Usage
from engine.serving.jobs import Job


@dataclass(frozen=True, slots=True)
class Row:
    """One prompt of one job: what a token event belongs to."""

    job_id: str
    prompt_index: int

    @property
    def engine_id(self) -> str:
        """The opaque id the engine's continuous batch knows this row by (it is never parsed
        back: the scheduler keeps the ``Row`` of each id it hands out)."""
        return f"{self.job_id}:{self.prompt_index}"


@dataclass(frozen=True, slots=True)
class RowEvent:
    """``row`` got ``token_id`` (-1 when the event carries no new token: its end). ``result`` is
    set on the row's last event."""

    row: Row
    token_id: int
    result: Result | None = None
    logprob: TokenLogprob | None = None  # token_id's, when the job asked for logprobs


class JobEvents:
    """Per-job token events on the event loop: a replay buffer plus subscriber queues, and
    waiters for the job's end. A channel lives while its job runs and is dropped at the end."""

    @dataclass
    class _Channel:
        events: list[RowEvent] = field(default_factory=list)
        queues: list[asyncio.Queue[RowEvent | None]] = field(default_factory=list)
        # A waiter's result is the job as it ended here (None when this process only knows that
        # it ended, e.g. cancelled or failed elsewhere: the waiter then reads the store).
        waiters: list[asyncio.Future[Job | None]] = field(default_factory=list)

    def __init__(self) -> None:
        self._channels: dict[str, JobEvents._Channel] = {}
        # Jobs that a stream subscribes to. Read by TokenForwarder on the engine's threads (a set
        # lookup is atomic under the GIL); changed only on the event loop.
        self.watched: set[str] = set()
        # Hands over token events that the forwarder holds back (see TokenForwarder); called on
        # the event loop before anything reads a replay buffer.
        self._drain: Callable[[], None] = lambda: None

    def attach(self, drain: Callable[[], None]) -> None:
        self._drain = drain

    def _channel(self, job_id: str) -> _Channel:
        ch = self._channels.get(job_id)
        if ch is None:
            ch = self._channels[job_id] = JobEvents._Channel()
        return ch

    def publish(self, row: Row, token_id: int, logprob: TokenLogprob | None = None) -> None:
        """On the event loop: ``row`` got ``token_id`` (with its logprob, when asked)."""
        self.publish_many(row.job_id, [RowEvent(row, token_id, logprob=logprob)])

    def publish_many(self, job_id: str, events: Sequence[RowEvent]) -> None:
        ch = self._channel(job_id)
        ch.events.extend(events)
        for q in ch.queues:
            for ev in events:
                q.put_nowait(ev)

    def subscribe(self, job_id: str) -> asyncio.Queue[RowEvent | None]:
        """A queue that first replays the job's events so far; ``None`` marks the end."""
        # Watched first, then drained: a token pushed in between is either in the drain or
        # schedules its own flush, never held back.
        self.watched.add(job_id)
        self._drain()
        ch = self._channel(job_id)
        q: asyncio.Queue[RowEvent | None] = asyncio.Queue()
        for ev in ch.events:
            q.put_nowait(ev)
        ch.queues.append(q)
        return q

    def unsubscribe(self, job_id: str, q: asyncio.Queue[RowEvent | None]) -> None:
        ch = self._channels.get(job_id)
        if ch is not None and q in ch.queues:
            ch.queues.remove(q)
            if not ch.queues:
                self.watched.discard(job_id)
            self._drop_if_idle(job_id, ch)

    def waiter(self, job_id: str) -> asyncio.Future[Job | None]:
        fut: asyncio.Future[Job | None] = asyncio.get_running_loop().create_future()
        self._channel(job_id).waiters.append(fut)
        return fut

    def discard_waiter(self, job_id: str, fut: asyncio.Future[Job | None]) -> None:
        ch = self._channels.get(job_id)
        if ch is not None and fut in ch.waiters:
            ch.waiters.remove(fut)
            self._drop_if_idle(job_id, ch)

    def finish(self, job_id: str, final: Sequence[RowEvent] = (), job: Job | None = None) -> None:
        """The job is terminal (or leaves this process): deliver ``final``, end streams, wake waiters.
        ``job`` is the job exactly as it was stored at its end: waiters answer from it instead of
        reading it back from the store."""
        ch = self._channels.pop(job_id, None)
        self.watched.discard(job_id)
        if ch is None:
            return
        for q in ch.queues:
            for ev in final:
                q.put_nowait(ev)
            q.put_nowait(None)
        for fut in ch.waiters:
            if not fut.done():
                fut.set_result(job)

    def finish_all(self) -> None:
        for job_id in list(self._channels):
            self.finish(job_id)

    def _drop_if_idle(self, job_id: str, ch: _Channel) -> None:
        if not ch.queues and not ch.waiters and not ch.events:
            self._channels.pop(job_id, None)


class TokenForwarder:
    """Collects token events on the engine's threads and hands them to the event loop.

    Only a job that a stream watches (``JobEvents.watched``) wakes the loop, at most once per loop
    iteration: a batch of 32 rows x 16 tokens used to cost the loop several hundred wake-ups per
    second, each one a GIL hand-over from CTranslate2's threads, while nobody listened (REST
    clients and unary gRPC calls only want the end). Events of unwatched jobs wait here until a
    stream subscribes (``drain``) or the engine call ends (``drop_unwatched``).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, events: JobEvents) -> None:
        self._loop = loop
        self._events = events
        self._lock = threading.Lock()
        self._pending: list[RowEvent] = []
        self._scheduled = False
        events.attach(self.drain)

    def push(self, row: Row, token_id: int) -> None:
        """On an engine thread: ``row`` got ``token_id``."""
        with self._lock:
            self._pending.append(RowEvent(row, token_id))
            if self._scheduled or row.job_id not in self._events.watched:
                return
            self._scheduled = True
        with contextlib.suppress(RuntimeError):  # loop closed: the process is ending
            self._loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        self.drain()

    def drain(self) -> None:
        """On the event loop: publish every event held so far."""
        with self._lock:
            pending, self._pending = self._pending, []
            self._scheduled = False
        self._publish(pending)

    def drop_unwatched(self) -> None:
        """On the event loop, once an engine call has ended: publish what watched jobs still have
        here and forget the rest (their jobs end now; nobody asked for their tokens)."""
        with self._lock:
            pending, self._pending = self._pending, []
            self._scheduled = False
        watched = self._events.watched
        self._publish([ev for ev in pending if ev.row.job_id in watched])

    def _publish(self, pending: list[RowEvent]) -> None:
        by_job: dict[str, list[RowEvent]] = {}
        for ev in pending:
            by_job.setdefault(ev.row.job_id, []).append(ev)
        for job_id, evs in by_job.items():
            self._events.publish_many(job_id, evs)


def final_events(job_id: str, results: Sequence[Result]) -> list[RowEvent]:
    return [RowEvent(Row(job_id, i), -1, r) for i, r in enumerate(results)]


def stored_final_events(job: Job) -> list[RowEvent]:
    """The final events of a job that completed earlier, rebuilt from the store."""
    res = job.result
    if res is None:
        return []
    events = []
    for i, text in enumerate(res.completion):
        usage = res.usages[i] if i < len(res.usages) else Usage(0, len(res.token_ids[i]))
        reason = FinishReason(res.finish_reasons[i]) if i < len(res.finish_reasons) else FinishReason.LENGTH
        logprobs = res.logprobs[i] if i < len(res.logprobs) else None
        result = Result(text, res.token_ids[i], usage, reason, logprobs)
        events.append(RowEvent(Row(job.id, i), -1, result))
    return events
