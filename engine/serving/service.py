"""JobService: the facade every transport (gRPC, REST shim, tests, harness) calls.

It validates and stores jobs, answers reads from the store, and owns the background tasks: the
scheduler's two loops (scheduler.py), the job-timeout sweep and the result-TTL purge. What the
transports call of it is written down once, as ``ServiceLike`` in engine/api/grpc_service.py;
beyond that, ``model_name`` (what a request's ``model`` must match), ``queue_depth()`` and
``retry_after_s()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from engine import logs
from engine.config import Config
from engine.errors import EngineError, InvalidRequest, NotFound, NotReady, Overloaded
from engine.limits import MAX_IDEMPOTENCY_KEY_CHARS
from engine.metrics import SHARED_DEPTH_MAX_AGE_S, Metrics
from engine.runtime.params import DecodingParams
from engine.runtime.protocols import EngineLike
from engine.serving.batching import BatchLimits, lane_of
from engine.serving.clock import Clock, RealClock
from engine.serving.events import JobEvents, RowEvent, stored_final_events
from engine.serving.finishing import Finisher
from engine.serving.jobs import Job, JobStatus, JobView, new_job_id
from engine.serving.remote_ends import RemoteEnds
from engine.serving.scheduler import Scheduler
from engine.serving.store.base import PURGE_BATCH, JobStore, LimitReached, QueueLimits, Replay, Submission
from engine.serving.worker import EngineWorker

log = logging.getLogger(__name__)


def check_idempotency_key(key: str) -> None:
    if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY_CHARS or not all(" " <= c <= "~" for c in key):
        raise InvalidRequest(
            f"the idempotency key must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} printable ASCII characters "
            "(a UUID is a good choice)"
        )


class JobService:
    """What every transport calls. Async methods run on the event loop; engine calls run in a
    worker thread (one engine call per device at a time)."""

    def __init__(
        self,
        config: Config,
        store: JobStore,
        engine: EngineLike,
        metrics: Metrics | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.engine = engine
        # Always present: without one from the server, a registry nobody scrapes (tests).
        self.metrics = metrics if metrics is not None else Metrics()
        self.clock: Clock = clock or RealClock()
        self.limits = BatchLimits(
            max_batch_size=config.max_batch_size,
            max_batch_tokens=config.max_batch_tokens,
            max_queue_delay_s=config.max_queue_delay_ms / 1000.0,
        )
        self.queue_limits = QueueLimits(
            max_queue_size=config.max_queue_size,
            max_queued_tokens=config.max_queued_tokens,
            max_queued_jobs_per_key=config.max_queued_jobs_per_key,
            max_queued_tokens_per_key=config.max_queued_tokens_per_key,
        )
        # Greedy on our decoder's continuous batch or on one-shot batched calls (Config.greedy_lane).
        lane = config.greedy_lane
        self.greedy_continuous = engine.greedy_continuous() if lane == "auto" else lane == "continuous"
        self.events = JobEvents()
        # Every end of a job (store, waiters, metrics) goes through it, the service's included.
        self.finisher = Finisher(
            store=store,
            events=self.events,
            metrics=self.metrics,
            clock=self.clock,
            job_timeout_s=config.job_timeout_s,
        )
        # engine_queue_depth: read from the store at scrape time, not on every submit and claim.
        self.metrics.watch_queue_depth(
            store.queue_depth, max_age_s=SHARED_DEPTH_MAX_AGE_S if store.shared else 0
        )
        self._scheduler: Scheduler | None = None
        # Ends of jobs waited on here that another server sharing the store runs: no events come.
        self.remote_ends = RemoteEnds(store, self._runs_here)
        self._worker: EngineWorker | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False
        self._stopping = False
        self._drained = False  # stopping, and the running jobs finished or went back to the queue
        self._commit: asyncio.Future[None] | None = None  # the shared commit of waiting submits

    # -- lifecycle -----------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        """The name clients may pass as ``model``: the model folder's name (or the manifest's source)."""
        if self.config.model_dir:
            return Path(self.config.model_dir).name
        return self.engine.manifest.source

    async def start(self) -> None:
        """Take up jobs left queued or running by the last process, then start the loops."""
        if self._started:
            return
        requeued = self.store.requeue_running()
        if requeued:
            log.warning("re-running %d job(s) that were running when the last process stopped", len(requeued))
        depth = self.store.queue_depth()
        if depth:
            log.info("%d job(s) waiting in the queue from before the start", depth)
        self._worker = EngineWorker(batch_scheduling=self.config.batch_scheduling)
        self._scheduler = Scheduler(
            store=self.store,
            engine=self.engine,
            worker=self._worker,
            clock=self.clock,
            limits=self.limits,
            finisher=self.finisher,
            metrics=self.metrics,
            events=self.events,
        )
        self._tasks = [
            asyncio.create_task(self._scheduler.run_batches(), name="batch-loop"),
            asyncio.create_task(self._scheduler.run_continuous(), name="continuous-loop"),
            asyncio.create_task(self._sweep_timeouts(), name="timeouts"),
            asyncio.create_task(self._purge_results(), name="purge"),
            asyncio.create_task(self.remote_ends.run(), name="remote-ends"),
        ]
        self._started = True

    async def stop(self, drain_timeout_s: float = 30.0, *, close_store: bool = True) -> None:
        """Stop accepting (NotReady), let the running batch finish within ``drain_timeout_s``,
        put back in the queue what did not, answer every wait for a job that did not finish with
        NotReady (``wait``), and close the store (unless ``close_store`` is False: the caller
        closes it once its servers stopped, so that late reads still find it open)."""
        if not self._started or self._stopping:
            return
        self._stopping = True
        sched = self._scheduler
        assert sched is not None  # set by start()
        sched.stop_claiming()
        loops = self._tasks[:2]
        _done, pending = await asyncio.wait(loops, timeout=drain_timeout_s)
        if pending:
            if sched.running:
                log.warning(
                    "drain timeout (%.1f s): stopping %d running job(s) and putting them back in the queue",
                    drain_timeout_s,
                    len(sched.running),
                )
            sched.abort_running()
            # The engine stops each row at its next token; give it a moment, then requeue directly.
            _done, pending = await asyncio.wait(loops, timeout=5.0)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for rj in list(sched.running.values()):
            # A store that is down now requeues them at the next start (requeue_running).
            with contextlib.suppress(EngineError):
                self.store.requeue(rj.job.id, rj.attempt)
        sched.running.clear()
        self._drained = True  # before the waiters wake: they answer NotReady, not the job as it is
        self.events.finish_all()
        if self._worker is not None:
            self._worker.stop()
        if close_store:
            self.store.close()

    @property
    def ready(self) -> bool:
        """Started, engine loaded, store reachable, not stopping."""
        return self._started and not self._stopping and self.store.ping()

    # -- requests ------------------------------------------------------------------------------
    async def submit(
        self,
        owner: str,
        prompts: Sequence[str],
        params: DecodingParams,
        model: str | None = None,
        idempotency_key: str | None = None,
    ) -> JobView:
        """Queue a job. With an ``idempotency_key`` (the client's Idempotency-Key), a submit that
        repeats one of the same owner answers the job that one made, for as long as the store
        holds it (result_ttl_s after it ended), across restarts and servers sharing the store."""
        self._check_accepting()
        # The request's limits (prompt count and size, max_new_tokens, model) were checked at the
        # edge (engine/api/grpc_service.py, engine/limits.py); here only the types are.
        prompts = self._check_prompts(prompts)
        if idempotency_key is not None:
            check_idempotency_key(idempotency_key)
            earlier = self.store.find_idempotent(owner, idempotency_key)
            if earlier is not None:  # before the limits: a retry of an accepted job is no new load
                return await self._replay(owner, earlier, prompts, params, model)
        input_ids = self.engine.tokenize(prompts)  # PromptTooLong says which prompt and by how much
        tokens = sum(len(ids) for ids in input_ids)
        self._check_request_fits(tokens)
        job = Job(
            id=new_job_id(),
            owner=owner,
            prompts=tuple(prompts),
            params=params,
            created_at=self.clock.time(),
            model=model,
        )
        logs.bind(job_id=job.id)  # the rest of the request's log lines name the job
        sched = self._scheduler
        assert sched is not None  # _check_accepting() saw start()
        sched.input_ids[job.id] = input_ids
        lane = lane_of(params, greedy_continuous=self.greedy_continuous)
        try:
            try:
                self.store.enqueue_deferred(
                    Submission(job, tokens, lane, idempotency_key=idempotency_key, limits=self.queue_limits)
                )
            except Replay as replay:  # the same key came in since find_idempotent (another server)
                sched.input_ids.pop(job.id, None)
                return await self._replay(owner, replay.job_id, prompts, params, model)
            except LimitReached as full:
                raise self._overloaded(full, tokens) from None
            position = self.store.position(job.id)
            sched.notify(lane)
            await self._committed()
            if self.store.lost(job.id):
                raise NotReady("the job store could not save the job; retry in a moment")
        except BaseException:
            sched.input_ids.pop(job.id, None)
            raise
        return JobView(job, position)

    async def _replay(
        self, owner: str, job_id: str, prompts: Sequence[str], params: DecodingParams, model: str | None
    ) -> JobView:
        """The job an earlier submit with the same idempotency key made, once it is durable."""
        await self._committed()  # it may be in the open group commit
        job = self.store.get(job_id)
        if job is None:  # its commit failed (that submit was answered 503) or it was just purged
            raise NotReady("the job store could not save the job; retry in a moment")
        if job.prompts != tuple(prompts) or job.params != params or job.model != model:
            raise InvalidRequest(
                "this Idempotency-Key was used for a different request (other prompts, params or "
                "model); send a new key for a new request"
            )
        position = self.store.position(job_id) if job.status is JobStatus.QUEUED else 0
        return JobView(job, position)

    async def _committed(self) -> None:
        """Until the submits enqueued so far are durable: one commit for all the submits that the
        event loop takes in before it gets to it (a burst of 32 after each finished batch paid 32
        commits, a third of each submit's time, while the rest of the burst waited)."""
        fut = self._commit
        if fut is None:
            loop = asyncio.get_running_loop()
            fut = self._commit = loop.create_future()
            loop.call_soon(self._commit_now)
        await asyncio.shield(fut)  # one submit's cancellation must not cancel the others' wait

    def _commit_now(self) -> None:
        fut, self._commit = self._commit, None
        assert fut is not None
        try:
            self.store.commit_deferred()
        except Exception as exc:
            fut.set_exception(exc)
        else:
            fut.set_result(None)

    async def get(self, owner: str, job_id: str) -> JobView:
        job = self._owned(owner, job_id)
        position = self.store.position(job_id) if job.status is JobStatus.QUEUED else 0
        return JobView(job, position)

    async def cancel(self, owner: str, job_id: str) -> JobView:
        """Queued: cancelled at once. Running: cancelled at once in the store; its rows leave the
        engine at their next token (next step on our decoder's continuous batch). Finished: returned unchanged."""
        job = self._owned(owner, job_id)
        if job.status.terminal:
            return JobView(job, 0)
        now = self.clock.time()
        updated = self.store.cancel(job_id, now)
        if updated is None:
            raise NotFound(f"no job {job_id} for this API key")
        if updated.status is JobStatus.CANCELLED and job.status is not JobStatus.CANCELLED:
            if self._scheduler is not None:
                self._scheduler.input_ids.pop(job_id, None)
            self.finisher.cancelled(job, now)
        return JobView(updated, 0)

    async def wait(self, owner: str, job_id: str, timeout_s: float | None = None) -> JobView:
        """Once the job is terminal, or after ``timeout_s`` (then it is returned as it is).

        Raises NotReady (with a Retry-After) when the server stops before the job ends here: a
        queued job once stopping began (this server no longer runs any), any unfinished job once
        the drain is over. A caller never mistakes the shutdown for the job's end or for a plain
        long-poll timeout, and retries (on another server sharing the store, or after a restart:
        the job stays queued)."""
        # The waiter exists before the store is read, so an end between the two is not missed.
        fut = self.events.waiter(job_id)
        try:
            job = self._owned(owner, job_id)
            if job.status.terminal:
                return JobView(job, 0)
            if self._drained or (self._stopping and job.status is JobStatus.QUEUED):
                raise self._stopped_before(job_id)
            ended = await self._until_terminal(job_id, fut, timeout_s)
        finally:
            self.events.discard_waiter(job_id, fut)
        if ended is not None and ended.owner == owner:
            return JobView(ended, 0)  # as stored at its end: no read back
        if self._drained:  # woken by the shutdown (finish_all), not by the job's end
            raise self._stopped_before(job_id)
        view = await self.get(owner, job_id)
        if self._stopping and not view.job.status.terminal:
            raise self._stopped_before(job_id)  # left the engine unfinished (aborted, requeued)
        return view

    @staticmethod
    def _stopped_before(job_id: str) -> NotReady:
        return NotReady(
            f"the server is stopping and job {job_id} has not finished here; it stays queued for "
            "the next server: retry",
            retry_after_s=1.0,
        )

    async def stream(self, owner: str, job_id: str) -> AsyncIterator[RowEvent]:
        """Token events as they are generated (each names its ``Row``: job id, prompt index), then
        one final event per prompt with its ``result`` when the job completes. Ends once the job
        is terminal (call ``get`` for a failure's reason) or leaves this server on shutdown.
        A job that finished earlier yields its final events at once."""
        self._owned(owner, job_id)
        q = self.events.subscribe(job_id)
        try:
            job = self._owned(owner, job_id)  # subscribe first, then look: no event falls between
            if job.status.terminal:
                for ev in stored_final_events(job) if job.status is JobStatus.COMPLETED else []:
                    yield ev
                return
            getter: asyncio.Future[RowEvent | None] | None = None
            elsewhere = self.remote_ends.watch(job_id)  # run by another server: no local events
            try:
                while True:
                    if getter is None:
                        getter = asyncio.ensure_future(q.get())
                    waits: set[asyncio.Future[Any]] = {getter} if elsewhere.done() else {getter, elsewhere}
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                    if not getter.done() and q.empty():  # ended elsewhere, and nothing left here
                        job = self._owned(owner, job_id)
                        for ev in stored_final_events(job) if job.status is JobStatus.COMPLETED else []:
                            yield ev
                        return
                    if not getter.done():
                        continue  # events came in: take them first
                    event, getter = getter.result(), None
                    if event is None:
                        return
                    yield event
            finally:
                self.remote_ends.unwatch(job_id, elsewhere)
                if getter is not None:
                    getter.cancel()
        finally:
            self.events.unsubscribe(job_id, q)

    # -- helpers -------------------------------------------------------------------------------
    def queue_depth(self) -> int:
        return self.store.queue_depth()

    def retry_after_s(self) -> float:
        """When a full queue is likely to have room: about one batch's time, 1 to 60 s."""
        batch_s = self._scheduler.batch_seconds_ewma if self._scheduler is not None else 0.0
        return float(min(60.0, max(1.0, round(batch_s + 0.5))))

    def _check_accepting(self) -> None:
        if self._stopping:
            raise NotReady("the server is shutting down and accepts no new jobs; retry on another instance")
        if not self._started:
            raise NotReady("the job service is starting; retry in a moment")

    def _check_request_fits(self, tokens: int) -> None:
        """400 for a request that no state of the queue can admit (the queue's own limits are
        checked by the store, atomically with the enqueue: ``_overloaded``)."""
        most = min(self.queue_limits.max_queued_tokens, self.queue_limits.max_queued_tokens_per_key)
        if tokens > most:
            raise InvalidRequest(
                f"this request has {tokens} prompt tokens; one API key may have at most {most} queued "
                "(max_queued_tokens_per_key, max_queued_tokens): split it into smaller requests"
            )

    def _overloaded(self, full: LimitReached, tokens: int) -> Overloaded:
        """429 with Retry-After, naming the limit the job would have passed."""
        load, limit = full.load, getattr(self.queue_limits, full.limit)
        why = {
            "max_queue_size": f"the queue is full ({load.jobs} jobs waiting, max_queue_size {limit}); retry later",
            "max_queued_tokens": (
                f"the queue is full ({load.tokens} prompt tokens waiting; this request's {tokens} would "
                f"pass max_queued_tokens {limit}); retry later"
            ),
            "max_queued_jobs_per_key": (
                f"this API key has {load.owner_jobs} jobs queued, the limit max_queued_jobs_per_key is "
                f"{limit}; retry once some have finished"
            ),
            "max_queued_tokens_per_key": (
                f"this API key has {load.owner_tokens} prompt tokens queued; this request's {tokens} would "
                f"pass max_queued_tokens_per_key {limit}; retry once some have finished"
            ),
        }[full.limit]
        return Overloaded(why, retry_after_s=self.retry_after_s())

    def _check_prompts(self, prompts: Sequence[str]) -> list[str]:
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise InvalidRequest("prompts must be a list of strings")
        if not prompts:
            raise InvalidRequest("prompt must be a string or a non-empty list of strings; got an empty list")
        bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
        if bad:
            raise InvalidRequest(f"every prompt must be a string; prompt(s) {bad[:5]} are not")
        return list(prompts)

    def _owned(self, owner: str, job_id: str) -> Job:
        job = self.store.get(job_id)
        if job is None or job.owner != owner:
            # One message for both: another key's job must not be told apart from an unknown id.
            raise NotFound(f"no job {job_id} for this API key")
        return job

    async def _until_terminal(
        self, job_id: str, fut: asyncio.Future[Job | None], timeout_s: float | None
    ) -> Job | None:
        """Until this process ends the job (``fut``), the store says it ended (another server
        sharing the store ran it: ``RemoteEnds``), or ``timeout_s`` passes on the clock. Returns the ended job
        when this process ended it and handed it over, else None (the caller reads the store)."""
        elsewhere = self.remote_ends.watch(job_id)
        waits: set[asyncio.Future[Any]] = {fut, elsewhere}
        sleeper = None
        if timeout_s is not None:
            sleeper = asyncio.ensure_future(self.clock.sleep(timeout_s))
            waits.add(sleeper)
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            return fut.result() if fut.done() else None
        finally:
            self.remote_ends.unwatch(job_id, elsewhere)
            if sleeper is not None:
                sleeper.cancel()

    def _runs_here(self, job_id: str) -> bool:
        return self._scheduler is not None and job_id in self._scheduler.running

    # -- periodic tasks ------------------------------------------------------------------------
    async def _sweep_timeouts(self) -> None:
        timeout = self.config.job_timeout_s
        period = min(1.0, timeout / 10)
        while True:
            await self.clock.sleep(period)
            try:
                self._expire(timeout)
            except NotReady:
                pass  # the store is down: its StoreHealth logs that, once, not every period
            except Exception:
                log.exception("timeout sweep failed; retrying in %.1f s", period)

    def _expire(self, timeout: float) -> None:
        now = self.clock.time()
        for job_id in self.store.queued_before(now - timeout):
            job = self.store.get(job_id)
            if job is None:
                continue
            if self.finisher.expire_queued(job, now) and self._scheduler is not None:
                self._scheduler.input_ids.pop(job_id, None)
        self.finisher.expire_running(now)
        if self._scheduler is not None:
            self._scheduler.sync_cancellations()
            stranded = self.store.reconcile(set(self._scheduler.running))
            if stranded:
                log.warning(
                    "%d job(s) whose end could not be written to the store go back to the queue: %s",
                    len(stranded),
                    ", ".join(stranded[:5]),
                )
                self._scheduler.notify_all()
            self._free_token_ids(self._scheduler)

    def _free_token_ids(self, sched: Scheduler) -> None:
        """Drop the token ids kept from submit for jobs that left the queue without this process
        claiming them: run by another server sharing the store, or ended by a path that did not
        pass here. Every other end (claim, cancel, queued timeout) drops them at once."""
        held = [job_id for job_id in sched.input_ids if job_id not in sched.running]
        if not held:
            return
        queued = self.store.still_queued(held)
        for job_id in held:
            if job_id not in queued:
                sched.input_ids.pop(job_id, None)

    async def _purge_results(self) -> None:
        ttl = self.config.result_ttl_s
        period = min(60.0, ttl / 10)
        while True:
            await self.clock.sleep(period)
            purged = 0
            try:
                while True:  # in bounded batches, letting requests in between
                    n = self.store.purge_expired(self.clock.time(), ttl, limit=PURGE_BATCH)
                    purged += n
                    if n < PURGE_BATCH:
                        break
                    await asyncio.sleep(0)
            except NotReady:
                continue  # the store is down (logged by its StoreHealth)
            except Exception:
                log.exception("result purge failed; retrying in %.0f s", period)
                continue
            if purged:
                log.info("purged %d finished job(s) older than result_ttl_s=%g s", purged, ttl)
