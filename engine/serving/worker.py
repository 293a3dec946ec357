"""Engine calls off the event loop: one daemon thread per device runs them one at a time.

A plain thread rather than a ThreadPoolExecutor: at interpreter exit an executor joins its
threads, so an engine call that never returns would keep a stopping server alive; a daemon thread
does not. One call at a time because CTranslate2 already uses every core for one call (intra
threads), and two concurrent calls on one device only compete for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_STOP = object()
log = logging.getLogger(__name__)


def use_batch_scheduling() -> bool:
    """Put the calling thread under Linux's SCHED_BATCH policy (threads it starts inherit it).

    The engine's compute threads keep their full share of the CPU, but no longer preempt the
    event loop when they wake up (CTranslate2's workers wake hundreds of times a second, e.g. to
    take the GIL for the per-token callback), and a waking event loop or client takes the core
    from them at once instead of queueing behind them (benchmarks/RESULTS.md, "API latency at 50
    clients"). Returns False where the policy does not exist (not Linux) or is refused; nothing
    else changes then.
    """
    setter = getattr(os, "sched_setscheduler", None)
    policy = getattr(os, "SCHED_BATCH", None)
    if setter is None or policy is None:
        return False
    try:
        setter(0, policy, os.sched_param(0))
    except OSError as exc:
        log.info("SCHED_BATCH refused for the engine's threads (%s); they keep the default policy", exc)
        return False
    return True


async def run_in_new_thread(fn: Callable[..., T], *args: Any, batch_scheduling: bool = False) -> T:
    """``fn(*args)`` on a thread of its own (SCHED_BATCH first when asked), awaited from the loop.
    For loading an engine: the threads it starts (CTranslate2's workers) inherit the policy."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def target() -> None:
        if batch_scheduling:
            use_batch_scheduling()
        try:
            value = fn(*args)
        except BaseException as exc:
            _deliver(loop, fut, None, exc)
        else:
            _deliver(loop, fut, value, None)

    threading.Thread(target=target, name="engine-load", daemon=True).start()
    return await fut


class EngineWorker:
    def __init__(self, name: str = "engine-worker", *, batch_scheduling: bool = False) -> None:
        self._batch_scheduling = batch_scheduling
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._stopped = False

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the worker thread and await its result (or its exception)."""
        if self._stopped:
            raise RuntimeError("engine worker is stopped")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._queue.put((fn, args, loop, fut))
        return await fut

    def stop(self) -> None:
        """Let the thread end after the call in progress (if any)."""
        if not self._stopped:
            self._stopped = True
            self._queue.put(_STOP)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        if self._batch_scheduling:
            use_batch_scheduling()
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            fn, args, loop, fut = item
            try:
                value = fn(*args)
            except BaseException as exc:
                _deliver(loop, fut, None, exc)
            else:
                _deliver(loop, fut, value, None)


def _deliver(
    loop: asyncio.AbstractEventLoop, fut: asyncio.Future[Any], value: Any, exc: BaseException | None
) -> None:
    def settle() -> None:
        if fut.done():  # the awaiting task was cancelled
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(value)

    # RuntimeError: the loop closed while the call ran, so nobody waits for it any more.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(settle)
