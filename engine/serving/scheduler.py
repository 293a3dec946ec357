"""The scheduler: takes jobs from the store and runs them on the engine worker, in parts.

- planning, pure: batching.py (``plan_batch``, ``fair_order``: keys in turn);
- the batch loop: batch_loop.py (one-shot CTranslate2 calls);
- the continuous loop: continuous_loop.py (our decoder's batch, schedule / execute / update);
- finishing jobs (store, events, metrics) and the running jobs: finishing.py.

This class wires them together, keeps each loop alive through store outages, and is what the
service talks to. Both loops share one EngineWorker, so there is one engine call at a time per
device. Token events of the jobs that a stream watches are forwarded from the engine's threads to
the event loop in coalesced flushes (not one loop wake-up per token) and published on
``JobEvents`` for ``JobService.stream``; nobody else wakes the loop per token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from engine.errors import EngineError, NotReady
from engine.metrics import Metrics
from engine.runtime.protocols import EngineLike
from engine.serving.batch_loop import BatchLoop
from engine.serving.batching import BatchLimits, Lane
from engine.serving.clock import Clock
from engine.serving.continuous_loop import ContinuousLoop
from engine.serving.events import JobEvents, TokenForwarder
from engine.serving.finishing import Finisher, RunningJob
from engine.serving.loop_base import Loop, LoopParts, Wakeup
from engine.serving.store.base import JobStore
from engine.serving.worker import EngineWorker

log = logging.getLogger(__name__)

RESTART_DELAY_S = 1.0


class Scheduler:
    def __init__(
        self,
        *,
        store: JobStore,
        engine: EngineLike,
        worker: EngineWorker,
        clock: Clock,
        limits: BatchLimits,
        finisher: Finisher,
        metrics: Metrics,
        events: JobEvents,
    ) -> None:
        self.store = store
        self.clock = clock
        self.events = events
        self.finisher = finisher
        self.running: dict[str, RunningJob] = finisher.running
        self.input_ids: dict[str, list[tuple[int, ...]]] = {}  # from submit, saves re-tokenizing
        self._claiming = True
        self._wake = {lane: Wakeup(clock) for lane in Lane}
        parts = LoopParts(
            store=store,
            engine=engine,
            worker=worker,
            clock=clock,
            limits=limits,
            finisher=finisher,
            metrics=metrics,
            input_ids=self.input_ids,
            claiming=self.claiming,
        )
        self.batch_loop = BatchLoop(
            parts, forwarder=TokenForwarder(asyncio.get_running_loop(), events), wakeup=self._wake[Lane.BATCH]
        )
        self.continuous_loop = ContinuousLoop(parts, events=events, wakeup=self._wake[Lane.DECODER])

    @property
    def batch_seconds_ewma(self) -> float:
        """About how long an engine call takes (for Overloaded's retry_after_s)."""
        return self.batch_loop.batch_seconds_ewma

    # -- control from the service ----------------------------------------------------------------
    def claiming(self) -> bool:
        """Whether the loops still take jobs from the queue (False once shutdown begins)."""
        return self._claiming

    def notify(self, lane: Lane) -> None:
        self._wake[lane].set()

    def notify_all(self) -> None:
        for wake in self._wake.values():
            wake.set()

    def stop_claiming(self) -> None:
        self._claiming = False
        for wake in self._wake.values():
            wake.set()

    def abort_running(self) -> None:
        """Shutdown past the drain timeout: running rows stop at their next token and their jobs
        go back to the queue."""
        for rj in self.running.values():
            rj.aborted = True

    def sync_cancellations(self) -> None:
        """A job cancelled through another server sharing the store (Redis) stops here too: one
        store read for all the jobs running here. Nothing to read on a store that is not shared
        (a cancel through this process reaches the running job directly)."""
        if not self.store.shared:
            return
        watched = [job_id for job_id, rj in self.running.items() if not rj.stop]
        if not watched:
            return
        for job_id in self.store.cancelled(watched):
            rj = self.running.get(job_id)
            if rj is not None and not rj.stop:
                rj.cancelled = True
                self.events.finish(job_id)

    # -- the loops -------------------------------------------------------------------------------
    async def run_batches(self) -> None:
        """The batch loop: one-shot engine calls (the engine picks the backend per call)."""
        await self._supervised(Lane.BATCH, "batch", self.batch_loop)

    async def run_continuous(self) -> None:
        """The continuous loop: our decoder's batch, which jobs join and leave between steps."""
        await self._supervised(Lane.DECODER, "continuous", self.continuous_loop)

    async def _supervised(self, lane: Lane, name: str, loop: Loop) -> None:
        """Keep a loop alive through store outages: log, put its jobs back in the queue, retry."""
        while True:
            try:
                await loop.run()
                return
            except NotReady:
                pass  # the store is down: its StoreHealth logs that once, not once a second here
            except Exception:
                log.exception("the %s loop failed; restarting it in %.0f s", name, RESTART_DELAY_S)
            for rj in [rj for rj in self.running.values() if rj.lane is lane]:
                self.running.pop(rj.job.id, None)
                with contextlib.suppress(EngineError):  # still down: the next start requeues it
                    self.store.requeue(rj.job.id, rj.attempt)
                self.events.finish(rj.job.id)
            loop.abandon()
            if not self._claiming:
                return
            await self.clock.sleep(RESTART_DELAY_S)
