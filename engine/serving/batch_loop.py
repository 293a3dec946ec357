"""The batch loop: one-shot engine calls (CTranslate2: greedy, beam search, unseeded sampling).

Each turn asks the pure policy (batching.plan_batch: keys in turn, batch keys, limits, delay)
what to run, claims those jobs and runs them as one engine call on the worker (split into
max_batch_size chunks only when one job alone has more prompts); the Finisher ends each job.
"""

from __future__ import annotations

import logging
import time

from engine.runtime.protocols import OnToken
from engine.runtime.result import GenerationRequest, Result
from engine.serving.batching import DispatchReason, Lane, QueueEntry, fair_order, plan_batch
from engine.serving.events import Row, TokenForwarder
from engine.serving.finishing import RunningJob, engine_error
from engine.serving.loop_base import IDLE_POLL_S, Loop, LoopParts, Wakeup

log = logging.getLogger(__name__)


class BatchLoop(Loop):
    def __init__(self, parts: LoopParts, *, forwarder: TokenForwarder, wakeup: Wakeup) -> None:
        super().__init__(parts, wakeup)
        self.forwarder = forwarder
        self.batch_seconds_ewma = 0.0  # for Overloaded's retry_after_s

    async def run(self) -> None:
        while self.claiming():
            entries = self._candidates()
            now = self.clock.time()
            decision = plan_batch(entries, now, self.limits, self.turn)
            if decision.reason is DispatchReason.EMPTY:
                await self.wakeup.sleep(IDLE_POLL_S)
                continue
            if decision.reason is DispatchReason.WAIT:
                await self.wakeup.sleep(decision.wait_s)
                continue
            jobs = self.finisher.claim(decision.job_ids, now, Lane.BATCH)
            self.turn = next(e.owner for e in entries if e.job_id == decision.job_ids[0])
            if jobs:
                await self._run_batch(jobs)

    def _candidates(self) -> list[QueueEntry]:
        window = max(64, 4 * self.limits.max_batch_size)
        entries = self.store.queued(Lane.BATCH, window)
        if not entries:
            return []
        key = entries[0].batch_key
        if all(e.batch_key == key for e in entries):
            return entries  # the usual case: one read, not two, before a batch can start
        # The batch key of the job that goes first (the next key's turn), and its companions.
        return self.store.queued(Lane.BATCH, window, fair_order(entries, self.turn)[0].batch_key)

    async def _run_batch(self, batch: list[RunningJob]) -> None:
        start = time.perf_counter()
        try:
            try:
                results = await self.worker.run(self._generate, batch)
            finally:
                self.forwarder.drop_unwatched()
        except Exception as exc:
            if len(batch) > 1:
                # One bad job must not fail its neighbours: run each alone to find it.
                log.warning("batch of %d jobs failed (%s); retrying them one by one", len(batch), exc)
                for rj in batch:
                    await self._run_batch([rj])
                return
            job = batch[0].job
            log.exception(
                "job %s failed in the engine", job.id, extra={"job_id": job.id, "key_name": job.owner}
            )
            self.finisher.finish_failed(batch[0], engine_error(exc))
            return
        elapsed = time.perf_counter() - start
        self.batch_seconds_ewma = (
            elapsed if not self.batch_seconds_ewma else 0.8 * self.batch_seconds_ewma + 0.2 * elapsed
        )
        self.finisher.finish_batch(list(zip(batch, results, strict=True)), elapsed)

    def _generate(self, batch: list[RunningJob]) -> list[list[Result]]:
        """On the worker thread: tokenize what submit did not, run, split results back per job."""
        rows: list[tuple[RunningJob, int]] = []
        requests: list[GenerationRequest] = []
        for rj in batch:
            ids = self.input_ids.pop(rj.job.id, None) or self.engine.tokenize(rj.job.prompts)
            for i, prompt_ids in enumerate(ids):
                rows.append((rj, i))
                requests.append(GenerationRequest(tuple(prompt_ids), rj.job.params, i))
        out: list[Result] = []
        size = self.limits.max_batch_size
        for lo in range(0, len(requests), size):
            chunk_rows = rows[lo : lo + size]
            t0 = time.perf_counter()
            out.extend(self.engine.generate_requests(requests[lo : lo + size], self._on_token(chunk_rows)))
            self.metrics.inference.observe(time.perf_counter() - t0)
            self.metrics.batch_size.observe(len(chunk_rows))
        per_job: dict[str, list[Result]] = {rj.job.id: [] for rj in batch}
        for (rj, _), result in zip(rows, out, strict=True):
            per_job[rj.job.id].append(result)
        return [per_job[rj.job.id] for rj in batch]

    def _on_token(self, rows: list[tuple[RunningJob, int]]) -> OnToken:
        forward = self.forwarder.push
        clock = self.clock
        first_token = self.finisher.first_token

        def on_token(index: int, token_id: int) -> bool:
            rj, prompt_index = rows[index]
            if not rj.stop and clock.time() > rj.deadline:
                rj.timed_out = True
            if rj.stop:
                rj.stopped_rows.add(prompt_index)
                return True
            if not rj.first_token_seen:
                first_token(rj)
            forward(Row(rj.job.id, prompt_index), token_id)
            return False

        return on_token
