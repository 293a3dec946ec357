"""Time, injectable: the scheduler, timeouts and TTL purge read it, so tests can drive them.

One time base (Unix seconds) serves both the stored timestamps (which must survive a restart) and
the queue-delay arithmetic, so a job recovered from the store is measured on the same scale.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    def time(self) -> float:
        """Seconds since the epoch."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class RealClock:
    """Unix seconds that never step: the wall clock read once, at start, then advanced by the
    monotonic clock. A wall-clock step (NTP, an operator, a VM resumed) moves neither the queue
    delays nor the job timeouts of a running server; stored times stay Unix seconds."""

    def __init__(self) -> None:
        self._wall0 = time.time()
        self._mono0 = time.monotonic()

    def time(self) -> float:
        return self._wall0 + (time.monotonic() - self._mono0)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class FakeClock:
    """Time moves only when a test calls ``advance``; sleepers wake once their deadline has passed."""

    # Starts near zero: at today's epoch a double resolves only ~0.2 µs, too coarse for tests
    # that step through millisecond delays.
    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def time(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleepers.append((self._now + seconds, fut))
        try:
            await fut
        finally:
            self._sleepers = [(t, f) for t, f in self._sleepers if f is not fut]

    def advance(self, seconds: float) -> None:
        self._now += seconds
        for deadline, fut in list(self._sleepers):
            if deadline <= self._now + 1e-9 and not fut.done():
                fut.set_result(None)
