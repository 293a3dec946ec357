"""RemoteEnds: how a long poll learns that a job ended on another server sharing the store.

A waiter here (``JobService.wait`` behind GET /v1/response/{id}?wait=, gRPC Generate, a stream)
hears a job's end through ``JobEvents`` when this process runs it. A job that another server
runs sends no events here: one watcher per process asks the store, every ``REMOTE_POLL_S`` and
only while there are such waiters, for the status of all of them in one round trip
(``JobStore.ended``), off the event loop, and wakes the waiters of the jobs that ended. Before
it, each waiter read its own job once a second on the event loop (issue 11: the quiet key's p99
at the client was 6.5x its p99 without a flood, 1.94x inside the servers).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from engine.errors import NotReady
from engine.serving.store.base import JobStore

log = logging.getLogger(__name__)

# How often (real seconds) the store is asked about the jobs waited on here and run elsewhere:
# the most a long poll on one server answers late for a job that another server finished.
REMOTE_POLL_S = 0.1


class RemoteEnds:
    """Futures that resolve when the store says their job ended; one store read per tick for all."""

    def __init__(self, store: JobStore, runs_here: Callable[[str], bool]) -> None:
        self._store = store
        # Jobs this process runs now: their end comes through JobEvents, the store need not be asked.
        self._runs_here = runs_here
        self._watch: dict[str, list[asyncio.Future[None]]] = {}
        self._wanted = asyncio.Event()

    def watch(self, job_id: str) -> asyncio.Future[None]:
        """A future that resolves once the store says ``job_id`` is terminal (or gone). Give it
        back with ``unwatch`` when the wait ends, whichever way."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._watch.setdefault(job_id, []).append(fut)
        self._wanted.set()
        return fut

    def unwatch(self, job_id: str, fut: asyncio.Future[None]) -> None:
        futs = self._watch.get(job_id)
        if futs is not None and fut in futs:
            futs.remove(fut)
            if not futs:
                del self._watch[job_id]

    @property
    def watched(self) -> int:
        return len(self._watch)

    async def run(self) -> None:
        """The watcher task: idle while nobody waits, one ``JobStore.ended`` per tick otherwise."""
        while True:
            if not self._watch:
                self._wanted.clear()
                await self._wanted.wait()
            await asyncio.sleep(REMOTE_POLL_S)
            await self.tick()

    async def tick(self) -> None:
        """One read of the store for every watched job not running here; wakes those that ended."""
        ids = [job_id for job_id in self._watch if not self._runs_here(job_id)]
        if not ids:
            return
        try:
            # A worker thread: the store's own timeouts bound it, and a store marked down fails
            # at once (store_call), so a tick never holds the event loop or piles up.
            ended = await asyncio.to_thread(self._store.ended, ids)
        except NotReady:
            return  # the store is down: its StoreHealth logs that, once; the waiters keep waiting
        except Exception:
            log.exception("reading the status of %d waited-on job(s) failed; retrying", len(ids))
            return
        for job_id in ended:
            for fut in self._watch.pop(job_id, ()):
                with contextlib.suppress(asyncio.InvalidStateError):
                    fut.set_result(None)
