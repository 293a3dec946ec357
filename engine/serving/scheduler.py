"""The scheduler: two loops that take jobs from the store and run them on the engine worker.

- The batch loop asks the pure policy (batching.plan_batch) what to run, claims those jobs and
  runs them as one engine call (split into max_batch_size chunks only when one job alone has more
  prompts), then completes, fails or requeues each job.
- The contrastive loop keeps one engine ``decoder_batch()`` and, between decoder steps, adds
  queued contrastive jobs (up to max_batch_size rows) and removes cancelled or timed-out ones.

Both loops share one EngineWorker, so there is one engine call at a time per device. Token events
of the jobs that a stream watches are forwarded from the engine's threads to the event loop in
coalesced flushes (not one loop wake-up per token) and published on ``JobEvents`` for
``JobService.stream``; nobody else wakes the loop per token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from engine.errors import EngineError, InvalidRequest, Overloaded
from engine.metrics import Metrics
from engine.runtime.params import DecodingParams
from engine.runtime.protocols import DecoderBatchLike, EngineLike, OnToken
from engine.runtime.result import GenerationRequest, Result, TokenEvent, Usage
from engine.serving.batching import (
    BatchLimits,
    DispatchReason,
    Lane,
    QueueEntry,
    fair_order,
    lane_of,
    plan_batch,
)
from engine.serving.clock import Clock
from engine.serving.events import JobEvents, Row, RowEvent, TokenForwarder, final_events
from engine.serving.jobs import Job, JobError, JobResult, JobStatus
from engine.serving.store.base import Completion, JobStore
from engine.serving.worker import EngineWorker

log = logging.getLogger(__name__)

# How often an idle loop looks at the store even without a wake-up (jobs recovered or enqueued
# by another process); wake-ups from submit make the common case immediate.
IDLE_POLL_S = 1.0
RESTART_DELAY_S = 1.0


@dataclass
class RunningJob:
    """A claimed job as the loops see it. The flags are read by the worker thread (on_token)."""

    job: Job
    deadline: float  # clock time after which it fails with a timeout
    cancelled: bool = False
    timed_out: bool = False
    aborted: bool = False  # shutdown: requeue instead of finishing
    stopped_rows: set[int] = field(default_factory=set)  # prompt indexes we told the engine to stop

    @property
    def stop(self) -> bool:
        return self.cancelled or self.timed_out or self.aborted

    @property
    def attempt(self) -> int:
        return self.job.attempts


def timeout_error(job: Job, timeout_s: float, now: float, *, running: bool) -> JobError:
    waited = now - job.created_at
    where = "was still running" if running else "was still queued (it never started)"
    return JobError(
        code="timeout",
        message=(
            f"job exceeded job_timeout_s={timeout_s:g} s: it {where} {waited:.1f} s after submission; "
            "submit fewer or shorter jobs, or raise --job-timeout-s"
        ),
    )


def engine_error(exc: BaseException) -> JobError:
    if isinstance(exc, EngineError):
        return JobError(code=exc.code, message=exc.message)
    return JobError(code="job_failed", message=f"the engine failed on this job ({type(exc).__name__}: {exc})")


class Scheduler:
    def __init__(
        self,
        *,
        store: JobStore,
        engine: EngineLike,
        worker: EngineWorker,
        clock: Clock,
        limits: BatchLimits,
        job_timeout_s: float,
        metrics: Metrics | None,
        events: JobEvents,
    ) -> None:
        self.store = store
        self.engine = engine
        self.worker = worker
        self.clock = clock
        self.limits = limits
        self.job_timeout_s = job_timeout_s
        self.metrics = metrics
        self.events = events
        self.running: dict[str, RunningJob] = {}
        self.input_ids: dict[str, list[tuple[int, ...]]] = {}  # from submit, saves re-tokenizing
        self._wake = {Lane.BATCH: asyncio.Event(), Lane.DECODER: asyncio.Event()}
        self._claiming = True
        # Per lane: the owner whose job went first last time (the keys' turns rotate from it).
        self._turn: dict[Lane, str | None] = {Lane.BATCH: None, Lane.DECODER: None}
        self._forwarder = TokenForwarder(asyncio.get_running_loop(), events)
        # The rows in the contrastive decoder, by the id the decoder knows them by (Row.engine_id).
        self._engine_rows: dict[str, Row] = {}
        self.batch_seconds_ewma = 0.0  # for Overloaded's retry_after_s
        self.on_claimed: Callable[[int], None] = lambda count: None

    # -- control from the service ----------------------------------------------------------------
    def notify(self, lane: Lane) -> None:
        self._wake[lane].set()

    def stop_claiming(self) -> None:
        self._claiming = False
        for ev in self._wake.values():
            ev.set()

    def abort_running(self) -> None:
        """Shutdown past the drain timeout: running rows stop at their next token and their jobs
        go back to the queue."""
        for rj in self.running.values():
            rj.aborted = True

    def mark_cancelled(self, job_id: str) -> None:
        rj = self.running.get(job_id)
        if rj is not None:
            rj.cancelled = True

    def sync_cancellations(self) -> None:
        """A job cancelled through another server sharing the store (Redis) stops here too."""
        for rj in list(self.running.values()):
            if rj.stop:
                continue
            job = self.store.get(rj.job.id)
            if job is not None and job.status is JobStatus.CANCELLED:
                rj.cancelled = True
                self.events.finish(rj.job.id)

    def expire_running(self, now: float) -> list[RunningJob]:
        """Fail running jobs past their deadline at once (the engine drops them at its next token)."""
        expired = []
        for rj in list(self.running.values()):
            if rj.stop or now <= rj.deadline:
                continue
            rj.timed_out = True
            error = timeout_error(rj.job, self.job_timeout_s, now, running=True)
            if self.store.fail(rj.job.id, rj.attempt, error, now):
                self._observe_end(rj.job, JobStatus.FAILED, now)
                expired.append(rj)
            self.events.finish(rj.job.id)
        return expired

    # -- the batch loop --------------------------------------------------------------------------
    async def run_batches(self) -> None:
        await self._supervised(Lane.BATCH, self._batch_loop)

    async def run_contrastive(self) -> None:
        await self._supervised(Lane.DECODER, self._contrastive_loop)

    async def _supervised(self, lane: Lane, loop: Callable[[], Awaitable[None]]) -> None:
        """Keep a loop alive through store outages: log, put its jobs back in the queue, retry."""
        while True:
            try:
                await loop()
                return
            except Exception:
                log.exception("the %s loop failed; restarting it in %.0f s", lane.value, RESTART_DELAY_S)
            for rj in [rj for rj in self.running.values() if lane_of(rj.job.params) is lane]:
                self.running.pop(rj.job.id, None)
                with contextlib.suppress(EngineError):  # still down: the next start requeues it
                    self.store.requeue(rj.job.id, rj.attempt)
                self.events.finish(rj.job.id)
            if not self._claiming:
                return
            await self.clock.sleep(RESTART_DELAY_S)

    async def _batch_loop(self) -> None:
        while self._claiming:
            entries = self._candidates(Lane.BATCH)
            now = self.clock.time()
            decision = plan_batch(entries, now, self.limits, self._turn[Lane.BATCH])
            if decision.reason is DispatchReason.EMPTY:
                await self._sleep(Lane.BATCH, IDLE_POLL_S)
                continue
            if decision.reason is DispatchReason.WAIT:
                await self._sleep(Lane.BATCH, decision.wait_s)
                continue
            jobs = self._claim(decision.job_ids, now)
            self._turn[Lane.BATCH] = next(e.owner for e in entries if e.job_id == decision.job_ids[0])
            if jobs:
                await self._run_batch(jobs)

    def _candidates(self, lane: Lane) -> list[QueueEntry]:
        window = max(64, 4 * self.limits.max_batch_size)
        entries = self.store.queued(lane, window)
        if not entries:
            return []
        key = entries[0].batch_key
        if all(e.batch_key == key for e in entries):
            return entries  # the usual case: one read, not two, before a batch can start
        # The batch key of the job that goes first (the next key's turn), and its companions.
        return self.store.queued(lane, window, fair_order(entries, self._turn[lane])[0].batch_key)

    async def _sleep(self, lane: Lane, seconds: float) -> None:
        """Until ``seconds`` pass on the clock or a new job of this lane arrives."""
        wake = self._wake[lane]
        if wake.is_set():
            wake.clear()
            return
        waiter = asyncio.ensure_future(wake.wait())
        sleeper = asyncio.ensure_future(self.clock.sleep(seconds))
        try:
            await asyncio.wait({waiter, sleeper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            sleeper.cancel()
        wake.clear()

    def _claim(self, job_ids: Sequence[str], now: float) -> list[RunningJob]:
        jobs = self.store.claim(job_ids, now)
        claimed = []
        for job in jobs:
            rj = RunningJob(job, deadline=job.created_at + self.job_timeout_s)
            self.running[job.id] = rj
            claimed.append(rj)
            if self.metrics is not None:
                self.metrics.queue_wait.observe(max(0.0, now - job.created_at))
        if claimed:
            self.on_claimed(len(claimed))
            if self.metrics is not None:
                self.metrics.jobs_running.set(len(self.running))
        return claimed

    async def _run_batch(self, batch: list[RunningJob]) -> None:
        start = time.perf_counter()
        try:
            try:
                results = await self.worker.run(self._generate, batch)
            finally:
                self._forwarder.drop_unwatched()
        except Exception as exc:
            if len(batch) > 1:
                # One bad job must not fail its neighbours: run each alone to find it.
                log.warning("batch of %d jobs failed (%s); retrying them one by one", len(batch), exc)
                for rj in batch:
                    await self._run_batch([rj])
                return
            log.exception("job %s failed in the engine", batch[0].job.id)
            self._finish_failed(batch[0], engine_error(exc))
            return
        elapsed = time.perf_counter() - start
        self.batch_seconds_ewma = (
            elapsed if not self.batch_seconds_ewma else 0.8 * self.batch_seconds_ewma + 0.2 * elapsed
        )
        self._finish_batch(list(zip(batch, results, strict=True)), elapsed)

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
            if self.metrics is not None:
                self.metrics.inference.observe(time.perf_counter() - t0)
                self.metrics.batch_size.observe(len(chunk_rows))
        per_job: dict[str, list[Result]] = {rj.job.id: [] for rj in batch}
        for (rj, _), result in zip(rows, out, strict=True):
            per_job[rj.job.id].append(result)
        return [per_job[rj.job.id] for rj in batch]

    def _on_token(self, rows: list[tuple[RunningJob, int]]) -> OnToken:
        forward = self._forwarder.push
        clock = self.clock

        def on_token(index: int, token_id: int) -> bool:
            rj, prompt_index = rows[index]
            if not rj.stop and clock.time() > rj.deadline:
                rj.timed_out = True
            if rj.stop:
                rj.stopped_rows.add(prompt_index)
                return True
            forward(Row(rj.job.id, prompt_index), token_id)
            return False

        return on_token

    # -- finishing -------------------------------------------------------------------------------
    def _finish(self, rj: RunningJob, results: Sequence[Result], gen_seconds: float) -> None:
        self._finish_batch([(rj, results)], gen_seconds)

    def _finish_batch(
        self, finished: Sequence[tuple[RunningJob, Sequence[Result]]], gen_seconds: float
    ) -> None:
        """Store a finished engine call's jobs: the completed ones in one store transaction (one
        commit per batch, not per job), then wake their waiters with the job as stored."""
        now = self.clock.time()
        done: list[tuple[RunningJob, Sequence[Result], JobResult]] = []
        for rj, results in finished:
            if rj.cancelled or (rj.aborted and rj.stopped_rows) or rj.timed_out:
                self._finish_stopped(rj, now)
            else:
                done.append((rj, results, job_result(results)))
        if not done:
            return
        try:
            stored = self.store.complete_many(
                [Completion(rj.job.id, rj.attempt, result) for rj, _, result in done], now
            )
        except BaseException:
            # Still in ``running``: the loop's supervisor puts them back in the queue.
            for rj, _, _ in done:
                self.events.finish(rj.job.id)
            raise
        completed: list[tuple[Job, JobResult]] = []
        watched = self.events.watched
        for (rj, results, result), ok in zip(done, stored, strict=True):
            job = rj.job
            self.running.pop(job.id, None)
            if not ok:
                log.info("dropped a stale result for job %s (attempt %d)", job.id, rj.attempt)
                self.events.finish(job.id)
                continue
            ended = job.with_status(JobStatus.COMPLETED, finished_at=now, result=result)
            # Only a stream wants the final events; a long poll answers from ``ended``.
            self.events.finish(job.id, final_events(job.id, results) if job.id in watched else (), ended)
            completed.append((job, result))
        if self.metrics is not None and completed:
            # Counters once per batch: every finished batch's clients wait for this loop.
            m = self.metrics
            m.jobs.labels(status=JobStatus.COMPLETED.value).inc(len(completed))
            m.generated_tokens.inc(sum(r.usage.completion_tokens for _, r in completed))
            m.prompt_tokens.inc(sum(r.usage.prompt_tokens for _, r in completed))
            for job, result in completed:
                m.request_latency.observe(max(0.0, now - job.created_at))
                if result.usage.completion_tokens:
                    m.time_per_output_token.observe(gen_seconds / result.usage.completion_tokens)
        if self.metrics is not None:
            self.metrics.jobs_running.set(len(self.running))

    def _finish_stopped(self, rj: RunningJob, now: float) -> None:
        """A job the scheduler stopped before its end: cancelled, shut down, or timed out."""
        job = rj.job
        self.running.pop(job.id, None)
        try:
            if rj.cancelled:
                return  # the store already says CANCELLED, and the service counted it
            if rj.aborted and rj.stopped_rows:
                self.store.requeue(job.id, rj.attempt)
                return
            error = timeout_error(job, self.job_timeout_s, now, running=True)
            if self.store.fail(job.id, rj.attempt, error, now):
                self._observe_end(job, JobStatus.FAILED, now)
        finally:
            self.events.finish(job.id)
            if self.metrics is not None:
                self.metrics.jobs_running.set(len(self.running))

    def _finish_failed(self, rj: RunningJob, error: JobError) -> None:
        now = self.clock.time()
        self.running.pop(rj.job.id, None)
        if rj.aborted:
            self.store.requeue(rj.job.id, rj.attempt)
        elif not rj.cancelled and self.store.fail(rj.job.id, rj.attempt, error, now):
            self._observe_end(rj.job, JobStatus.FAILED, now)
        self.events.finish(rj.job.id)
        if self.metrics is not None:
            self.metrics.jobs_running.set(len(self.running))

    def _observe_end(self, job: Job, status: JobStatus, now: float) -> None:
        if self.metrics is not None:
            self.metrics.jobs.labels(status=status.value).inc()
            self.metrics.request_latency.observe(max(0.0, now - job.created_at))

    # -- the contrastive loop --------------------------------------------------------------------
    async def _contrastive_loop(self) -> None:
        batch: DecoderBatchLike | None = None
        active: dict[str, _ContrastiveJob] = {}
        waiting: list[tuple[Row, GenerationRequest | _Pending]] = []  # claimed rows not in the batch yet
        cancels: list[Row] = []
        while True:
            if not active:
                batch = None  # nothing of ours is in it: start the next job on a fresh batch
                waiting.clear()
                cancels.clear()
                self._engine_rows.clear()
                if not self._claiming:
                    return
                if not self.store.queued(Lane.DECODER, 1):
                    await self._sleep(Lane.DECODER, IDLE_POLL_S)
                    continue
            if self._claiming:
                waiting.extend(self._admit_contrastive(active))
            for cj in [cj for cj in active.values() if cj.rj.stop]:
                del active[cj.rj.job.id]
                cancels.extend(cj.rows())
                self._finish_contrastive_early(cj)
            if not active:
                continue
            live = {row for cj in active.values() for row in cj.rows()}
            adds = [(row, req) for row, req in waiting if row in live]
            try:
                tick = await self.worker.run(self._contrastive_tick, batch, adds, cancels)
            except Exception as exc:
                log.exception("contrastive step failed; failing the %d jobs in its batch", len(active))
                for cj in active.values():
                    self._finish_failed(cj.rj, engine_error(exc))
                active.clear()
                continue
            batch, cancels = tick.batch, []
            waiting = list(tick.deferred)
            for row, refusal in tick.rejected.items():
                refused = active.pop(row.job_id, None)
                if refused is not None:  # this job can never run here; its other rows leave too
                    cancels.extend(refused.rows())
                    self._finish_failed(refused.rj, engine_error(refusal))
            self._on_contrastive_events(active, tick.events)

    def _admit_contrastive(
        self, active: dict[str, _ContrastiveJob]
    ) -> list[tuple[Row, GenerationRequest | _Pending]]:
        rows = sum(len(cj.open_rows) for cj in active.values())
        tokens = sum(cj.tokens for cj in active.values())
        free = self.limits.max_batch_size - rows
        if free <= 0:
            return []
        chosen: list[QueueEntry] = []
        queue = self.store.queued(Lane.DECODER, max(64, self.limits.max_batch_size))
        for entry in fair_order(queue, self._turn[Lane.DECODER]):
            first = rows == 0 and not chosen  # the head always gets in: no starvation
            if not first and (
                entry.num_prompts > free or tokens + entry.cost_tokens > self.limits.max_batch_tokens
            ):
                break  # keep the order of turns: later jobs do not overtake one that does not fit yet
            chosen.append(entry)
            free -= entry.num_prompts
            tokens += entry.cost_tokens
            if free <= 0:
                break
        if not chosen:
            return []
        self._turn[Lane.DECODER] = chosen[0].owner
        costs = {e.job_id: e.cost_tokens for e in chosen}
        adds: list[tuple[Row, GenerationRequest | _Pending]] = []
        for rj in self._claim([e.job_id for e in chosen], self.clock.time()):
            ids = self.input_ids.pop(rj.job.id, None)
            cj = _ContrastiveJob(rj, ids, costs.get(rj.job.id, 0))
            active[rj.job.id] = cj
            adds.extend(cj.requests())
        return adds

    def _contrastive_tick(
        self,
        batch: DecoderBatchLike | None,
        adds: list[tuple[Row, GenerationRequest | _Pending]],
        cancels: list[Row],
    ) -> _Tick:
        """On the worker thread: leave, join (rows that do not fit yet wait), one decoder step."""
        if batch is None:
            batch = self.engine.decoder_batch()
        for row in cancels:
            batch.cancel(row.engine_id)
        deferred: list[tuple[Row, GenerationRequest | _Pending]] = []
        rejected: dict[Row, EngineError] = {}
        for row, req in adds:
            if deferred:  # keep queue order: nothing overtakes a row that is waiting for room
                deferred.append((row, req))
                continue
            try:
                if isinstance(req, _Pending):
                    req = GenerationRequest(
                        tuple(self.engine.tokenize([req.prompt])[0]), req.params, req.draw
                    )
                batch.add(row.engine_id, req)
                self._engine_rows[row.engine_id] = row
            except Overloaded:
                if not len(batch):
                    rejected[row] = InvalidRequest(
                        "this request needs more rows than the contrastive decoder has; lower top_k"
                    )
                else:
                    deferred.append((row, req))
            except EngineError as exc:
                rejected[row] = exc
        t0 = time.perf_counter()
        rows = len(batch)
        events = self._row_events(batch.step()) if rows else []
        if self.metrics is not None and rows:
            self.metrics.inference.observe(time.perf_counter() - t0)
            self.metrics.batch_size.observe(rows)
        return _Tick(batch, events, deferred, rejected)

    def _row_events(self, events: list[TokenEvent]) -> list[RowEvent]:
        """On the worker thread: the decoder's events, keyed by their rows again (a row's id is
        forgotten with its last event)."""
        out = []
        for ev in events:
            rows = self._engine_rows
            row = rows.pop(ev.request_id, None) if ev.result is not None else rows.get(ev.request_id)
            if row is not None:
                out.append(RowEvent(row, ev.token_id, ev.result))
        return out

    def _on_contrastive_events(self, active: dict[str, _ContrastiveJob], events: list[RowEvent]) -> None:
        for ev in events:
            job_id, prompt_index = ev.row.job_id, ev.row.prompt_index
            cj = active.get(job_id)
            if cj is None:
                continue  # a job that left between steps
            if ev.token_id >= 0:
                self.events.publish(ev.row, ev.token_id)
            if ev.result is not None:
                cj.results[prompt_index] = ev.result
                cj.open_rows.discard(prompt_index)
                if not cj.open_rows:
                    del active[job_id]
                    results = [cj.results[i] for i in range(len(cj.rj.job.prompts))]
                    self._finish(cj.rj, results, self.clock.time() - (cj.rj.job.started_at or 0.0))
            if self.clock.time() > cj.rj.deadline and not cj.rj.stop:
                cj.rj.timed_out = True

    def _finish_contrastive_early(self, cj: _ContrastiveJob) -> None:
        """A job leaving the batch before its end: cancelled, timed out, or shutdown."""
        rj = cj.rj
        if rj.aborted:
            rj.stopped_rows.update(cj.open_rows)
        self._finish(rj, [], 0.0)


@dataclass(frozen=True)
class _Tick:
    """What one contrastive step on the worker gives back to the loop."""

    batch: DecoderBatchLike
    events: list[RowEvent]
    deferred: list[tuple[Row, GenerationRequest | _Pending]]  # rows that did not fit yet
    rejected: dict[Row, EngineError]  # rows the decoder refused: their jobs fail


@dataclass(frozen=True)
class _Pending:
    """A prompt not tokenized yet (a job recovered from the store): tokenized on the worker."""

    prompt: str
    params: DecodingParams
    draw: int = 0  # the prompt's index in its job (GenerationRequest.draw)


@dataclass
class _ContrastiveJob:
    rj: RunningJob
    input_ids: list[tuple[int, ...]] | None
    tokens: int
    results: dict[int, Result] = field(default_factory=dict)
    open_rows: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.open_rows = set(range(len(self.rj.job.prompts)))

    def rows(self) -> list[Row]:
        """The rows still open in the decoder."""
        return [Row(self.rj.job.id, i) for i in self.open_rows]

    def requests(self) -> list[tuple[Row, GenerationRequest | _Pending]]:
        job = self.rj.job
        out: list[tuple[Row, GenerationRequest | _Pending]] = []
        for i, prompt in enumerate(job.prompts):
            row = Row(job.id, i)
            if self.input_ids is not None:
                out.append((row, GenerationRequest(tuple(self.input_ids[i]), job.params, i)))
            else:
                out.append((row, _Pending(prompt, job.params, i)))
        return out


def job_result(results: Sequence[Result]) -> JobResult:
    usages = tuple(r.usage for r in results)
    return JobResult(
        completion=tuple(r.text for r in results),
        token_ids=tuple(tuple(r.token_ids) for r in results),
        usage=Usage(
            prompt_tokens=sum(u.prompt_tokens for u in usages),
            completion_tokens=sum(u.completion_tokens for u in usages),
        ),
        finish_reasons=tuple(r.finish_reason.value for r in results),
        usages=usages,
    )
