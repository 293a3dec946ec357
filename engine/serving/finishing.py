"""Running jobs, from their claim to their end: the one place that writes a job's end to the
store, wakes its waiters and streams (``JobEvents``) and counts it in the metrics.

Both scheduler loops (batch_loop.py, continuous_loop.py) and the service's timeout sweep and
cancel end jobs through a ``Finisher``: completed (a whole engine call's jobs in one store
transaction), stopped early (cancelled, timed out, or put back in the queue on shutdown), or failed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.errors import EngineError
from engine.metrics import Metrics
from engine.runtime.result import FinishReason, Result, Usage
from engine.serving.batching import Lane
from engine.serving.clock import Clock
from engine.serving.events import JobEvents, final_events
from engine.serving.jobs import Job, JobError, JobResult, JobStatus
from engine.serving.store.base import Completion, JobStore

log = logging.getLogger(__name__)


@dataclass
class RunningJob:
    """A claimed job as the loops see it. The flags are read by the worker thread (on_token)."""

    job: Job
    deadline: float  # clock time after which it fails with a timeout
    lane: Lane = Lane.BATCH  # the loop that claimed it
    cancelled: bool = False
    timed_out: bool = False
    aborted: bool = False  # shutdown: requeue instead of finishing
    stopped_rows: set[int] = field(default_factory=set)  # prompt indexes we told the engine to stop
    first_token_seen: bool = False  # engine_time_to_first_token_seconds observed

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


def job_finish_reason(result: JobResult) -> str:
    """One reason for a job (its prompts may end differently): length if any prompt reached
    max_new_tokens, else stop if a stop sequence ended one, else eos."""
    reasons = set(result.finish_reasons)
    for reason in (FinishReason.LENGTH, FinishReason.STOP):
        if reason.value in reasons:
            return reason.value
    return FinishReason.EOS.value


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
        logprobs=tuple(r.logprobs or () for r in results)
        if any(r.logprobs is not None for r in results)
        else (),
    )


class Finisher:
    """The running jobs of this process (``running``), and every way they end."""

    def __init__(
        self, *, store: JobStore, events: JobEvents, metrics: Metrics, clock: Clock, job_timeout_s: float
    ) -> None:
        self.store = store
        self.events = events
        self.metrics = metrics
        self.clock = clock
        self.job_timeout_s = job_timeout_s
        self.running: dict[str, RunningJob] = {}

    # -- start -----------------------------------------------------------------------------------
    def claim(self, job_ids: Sequence[str], now: float, lane: Lane) -> list[RunningJob]:
        """QUEUED -> RUNNING in the store for those still queued; they run here from now on, on
        ``lane``'s loop."""
        claimed = []
        for job in self.store.claim(job_ids, now):
            rj = RunningJob(job, deadline=job.created_at + self.job_timeout_s, lane=lane)
            self.running[job.id] = rj
            claimed.append(rj)
            self.metrics.queue_wait.observe(max(0.0, now - job.created_at))
        if claimed:
            self._running_changed()
        return claimed

    # -- ends ------------------------------------------------------------------------------------
    def finish(self, rj: RunningJob, results: Sequence[Result], gen_seconds: float) -> None:
        self.finish_batch([(rj, results)], gen_seconds)

    def finish_batch(
        self, finished: Sequence[tuple[RunningJob, Sequence[Result]]], gen_seconds: float
    ) -> None:
        """Store a finished engine call's jobs: the completed ones in one store transaction (one
        commit per batch, not per job), then wake their waiters with the job as stored."""
        now = self.clock.time()
        done: list[tuple[RunningJob, Sequence[Result], JobResult]] = []
        for rj, results in finished:
            if rj.cancelled or (rj.aborted and rj.stopped_rows) or rj.timed_out:
                self.finish_stopped(rj, now)
            else:
                done.append((rj, results, job_result(results)))
        if not done:
            return
        try:
            stored = self.store.complete_many(
                [Completion(rj.job.id, rj.attempt, result) for rj, _, result in done], now
            )
        except BaseException:
            # Still in ``running``: the loop's supervisor puts them back in the queue, or, if the
            # store cannot take that either, the service's reconcile sweep does once it can.
            log.warning(
                "the results of %d finished job(s) could not be written to the store; they go back "
                "to the queue and run again",
                len(done),
            )
            for rj, _, _ in done:
                self.events.finish(rj.job.id)
            raise
        completed: list[tuple[Job, JobResult]] = []
        watched = self.events.watched
        for (rj, results, result), ok in zip(done, stored, strict=True):
            job = rj.job
            self.running.pop(job.id, None)
            if not ok:
                log.info(
                    "dropped a stale result for job %s (attempt %d)",
                    job.id,
                    rj.attempt,
                    extra={"job_id": job.id, "key_name": job.owner},
                )
                self.events.finish(job.id)
                continue
            ended = job.with_status(JobStatus.COMPLETED, finished_at=now, result=result)
            # Only a stream wants the final events; a long poll answers from ``ended``.
            self.events.finish(job.id, final_events(job.id, results) if job.id in watched else (), ended)
            completed.append((job, result))
        if completed:
            # Counters once per batch: every finished batch's clients wait for this loop.
            m = self.metrics
            m.generated_tokens.inc(sum(r.usage.completion_tokens for _, r in completed))
            m.prompt_tokens.inc(sum(r.usage.prompt_tokens for _, r in completed))
            for job, result in completed:
                m.job_ended(JobStatus.COMPLETED.value, job_finish_reason(result))
                for u in result.usages:
                    m.prompt_length.observe(u.prompt_tokens)
                    m.generation_length.observe(u.completion_tokens)
                m.request_latency.observe(max(0.0, now - job.created_at))
                if result.usage.completion_tokens:
                    m.time_per_output_token.observe(gen_seconds / result.usage.completion_tokens)
        self._running_changed()

    def finish_stopped(self, rj: RunningJob, now: float) -> None:
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
                self.observe_end(job, JobStatus.FAILED, now)
        finally:
            self.events.finish(job.id)
            self._running_changed()

    def finish_failed(self, rj: RunningJob, error: JobError) -> None:
        now = self.clock.time()
        self.running.pop(rj.job.id, None)
        if rj.aborted:
            self.store.requeue(rj.job.id, rj.attempt)
        elif not rj.cancelled and self.store.fail(rj.job.id, rj.attempt, error, now):
            self.observe_end(rj.job, JobStatus.FAILED, now)
        self.events.finish(rj.job.id)
        self._running_changed()

    def expire_running(self, now: float) -> list[RunningJob]:
        """Fail running jobs past their deadline at once (the engine drops them at its next token)."""
        expired = []
        for rj in list(self.running.values()):
            if rj.stop or now <= rj.deadline:
                continue
            rj.timed_out = True
            error = timeout_error(rj.job, self.job_timeout_s, now, running=True)
            if self.store.fail(rj.job.id, rj.attempt, error, now):
                self.observe_end(rj.job, JobStatus.FAILED, now)
                expired.append(rj)
            self.events.finish(rj.job.id)
        return expired

    def expire_queued(self, job: Job, now: float) -> bool:
        """A queued job past job_timeout_s -> FAILED (False when it left the queue meanwhile)."""
        if not self.store.fail(job.id, None, timeout_error(job, self.job_timeout_s, now, running=False), now):
            return False
        self.observe_end(job, JobStatus.FAILED, now)
        self.events.finish(job.id)
        return True

    def cancelled(self, job: Job, now: float) -> None:
        """The store says CANCELLED now (the service cancelled it): stop it here if it runs."""
        rj = self.running.get(job.id)
        if rj is not None:
            rj.cancelled = True
        self.observe_end(job, JobStatus.CANCELLED, now)
        self.events.finish(job.id)

    def first_token(self, rj: RunningJob) -> None:
        """The job's first generated token (on any thread: a histogram is thread-safe)."""
        rj.first_token_seen = True
        self.metrics.time_to_first_token.observe(max(0.0, self.clock.time() - rj.job.created_at))

    def observe_end(self, job: Job, status: JobStatus, now: float) -> None:
        self.metrics.job_ended(status.value)
        self.metrics.request_latency.observe(max(0.0, now - job.created_at))

    def _running_changed(self) -> None:
        self.metrics.jobs_running.set(len(self.running))
