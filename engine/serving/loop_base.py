"""What both scheduler loops share: their collaborators (``LoopParts``) and how they wait
(``Wakeup``: until a deadline on the clock or until a submit wakes them)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from engine.metrics import Metrics
from engine.runtime.protocols import EngineLike
from engine.serving.batching import BatchLimits
from engine.serving.clock import Clock
from engine.serving.finishing import Finisher
from engine.serving.store.base import JobStore
from engine.serving.worker import EngineWorker

# How often an idle loop looks at the store even without a wake-up (jobs recovered or enqueued
# by another process); wake-ups from submit make the common case immediate.
IDLE_POLL_S = 1.0


@dataclass(frozen=True)
class LoopParts:
    store: JobStore
    engine: EngineLike
    worker: EngineWorker
    clock: Clock
    limits: BatchLimits
    finisher: Finisher
    metrics: Metrics
    input_ids: dict[str, list[tuple[int, ...]]]  # the service's, from submit: saves re-tokenizing
    claiming: Callable[[], bool]  # False once shutdown begins: take no more jobs


class Loop:
    """A scheduler loop's collaborators, as attributes."""

    def __init__(self, parts: LoopParts, wakeup: Wakeup) -> None:
        self.store = parts.store
        self.engine = parts.engine
        self.worker = parts.worker
        self.clock = parts.clock
        self.limits = parts.limits
        self.finisher = parts.finisher
        self.metrics = parts.metrics
        self.input_ids = parts.input_ids
        self.claiming = parts.claiming
        self.wakeup = wakeup
        self.turn: str | None = None  # the owner whose job went first last time (fair_order)

    async def run(self) -> None:
        raise NotImplementedError

    def abandon(self) -> None:
        """Forget what the loop held between steps: its supervisor has just handed the loop's
        running jobs back to the queue (the loop failed), so the restarted loop starts clean."""


class Wakeup:
    """One per loop: ``set`` by submit (a job of its lane arrived) or by shutdown."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._event = asyncio.Event()

    def set(self) -> None:
        self._event.set()

    def pending(self) -> bool:
        """Whether ``set`` was called and not taken yet (a plain read: any thread may ask)."""
        return self._event.is_set()

    def take(self) -> bool:
        """Whether ``set`` was called since the last ``take`` or ``sleep`` (and clear it)."""
        if self._event.is_set():
            self._event.clear()
            return True
        return False

    async def sleep(self, seconds: float) -> None:
        """Until ``seconds`` pass on the clock or ``set`` is called (at once if it was meanwhile)."""
        wake = self._event
        if wake.is_set():
            wake.clear()
            return
        waiter = asyncio.ensure_future(wake.wait())
        sleeper = asyncio.ensure_future(self._clock.sleep(seconds))
        try:
            await asyncio.wait({waiter, sleeper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            sleeper.cancel()
        wake.clear()
