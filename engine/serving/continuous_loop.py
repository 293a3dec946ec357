"""The continuous loop: our decoder's batch (contrastive search, seeded sampling), which jobs join
and leave between decoder steps.

Each step reads as vLLM v1's engine step: ``schedule()`` (on the event loop: admit queued jobs in
the keys' turn up to max_batch_size rows and max_batch_tokens, take out stopped ones) ->
``execute()`` (on the worker thread: rows leave and join, one decoder step) -> ``update()`` (on
the event loop: publish tokens, hand finished and refused jobs to the Finisher). The loop's state
lives in the object, so each phase is a method a reader (and a test) can call on its own.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from engine.errors import EngineError, InvalidRequest, Overloaded
from engine.runtime.params import DecodingParams
from engine.runtime.protocols import DecoderBatchLike
from engine.runtime.result import GenerationRequest, Result, TokenEvent
from engine.serving.batching import Lane, QueueEntry, fair_order
from engine.serving.events import JobEvents, Row, RowEvent
from engine.serving.finishing import RunningJob, engine_error
from engine.serving.loop_base import IDLE_POLL_S, Loop, LoopParts, Wakeup

log = logging.getLogger(__name__)

# While the batch runs, the store's queue is read between steps only when there is a reason to: a
# submit of this lane woke the loop, rows left the batch, or this long passed since the last read
# (jobs queued by other servers sharing the store, or requeued ones). Reading it every step cost a
# store query per step (a Redis round trip), which greedy's 1-4 ms steps feel.
ADMIT_POLL_S = 0.05
# After a step the worker runs the next one at once, without going back to the event loop, while
# nothing there needs it: no row ended, nothing woke the loop, no queue poll is due, and no job in
# the batch is stopped, past its deadline, watched by a stream or waiting for its first token; for
# at most this long. Each return to the event loop costs a thread hand-off plus schedule/update,
# which a 1-2 ms greedy step feels (benchmarks/bench_chain.py, RESULTS.md).
CHAIN_S = 0.02


@dataclass(frozen=True)
class _Pending:
    """A prompt not tokenized yet (a job recovered from the store): tokenized on the worker."""

    prompt: str
    params: DecodingParams
    draw: int = 0  # the prompt's index in its job (GenerationRequest.draw)


Join = tuple[Row, GenerationRequest | _Pending]


@dataclass(frozen=True)
class StepPlan:
    """What ``schedule`` decided for the next step: rows that join, rows that leave."""

    batch: DecoderBatchLike | None  # None: a fresh batch
    adds: list[Join]
    cancels: list[Row]


@dataclass(frozen=True)
class StepOutput:
    """What one step on the worker gives back to ``update``."""

    batch: DecoderBatchLike
    events: list[RowEvent]
    deferred: list[Join]  # rows that did not fit yet
    rejected: dict[Row, EngineError]  # rows the decoder refused: their jobs fail


@dataclass
class _ActiveJob:
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

    def requests(self) -> list[Join]:
        job = self.rj.job
        out: list[Join] = []
        for i, prompt in enumerate(job.prompts):
            row = Row(job.id, i)
            if self.input_ids is not None:
                out.append((row, GenerationRequest(tuple(self.input_ids[i]), job.params, i)))
            else:
                out.append((row, _Pending(prompt, job.params, i)))
        return out


class ContinuousLoop(Loop):
    def __init__(self, parts: LoopParts, *, events: JobEvents, wakeup: Wakeup) -> None:
        super().__init__(parts, wakeup)
        self.events = events
        # The loop's state between steps.
        self.batch: DecoderBatchLike | None = None
        self.active: dict[str, _ActiveJob] = {}
        self.waiting: list[Join] = []  # claimed rows not in the batch yet
        self.cancels: list[Row] = []
        # The rows in the decoder, by the id the decoder knows them by (Row.engine_id); read and
        # written on the worker thread while a step runs.
        self.engine_rows: dict[str, Row] = {}
        # When schedule() reads the queue next without a wake-up or freed rows (clock time).
        self.admit_due = 0.0
        self.rows_freed = False

    async def run(self) -> None:
        while True:
            if not self.active:
                self._reset()
                if not self.claiming():
                    return
                if not self.store.queued(Lane.DECODER, 1):
                    await self.wakeup.sleep(IDLE_POLL_S)
                    continue
            plan = self.schedule()
            if plan is None:
                continue
            try:
                output = await self.worker.run(self.execute, plan)
            except Exception as exc:
                log.exception("decoder step failed; failing the %d jobs in its batch", len(self.active))
                for job in self.active.values():
                    self.finisher.finish_failed(job.rj, engine_error(exc))
                self.active.clear()
                continue
            self.update(output)

    def abandon(self) -> None:
        self.active.clear()
        self._reset()

    def _reset(self) -> None:
        """Nothing of ours is in the batch: the next job starts on a fresh one."""
        self.batch = None
        self.admit_due = 0.0  # the first schedule() reads the queue
        self.waiting.clear()
        self.cancels.clear()
        self.engine_rows.clear()

    # -- schedule: on the event loop -------------------------------------------------------------
    def schedule(self) -> StepPlan | None:
        """Admit queued jobs (claimed in the keys' turn), take stopped ones out (cancelled, timed
        out, shut down); None when no job of ours is left for a step."""
        if self.claiming() and self._admit_now():
            self.waiting.extend(self._admit())
        for job in [job for job in self.active.values() if job.rj.stop]:
            del self.active[job.rj.job.id]
            self.rows_freed = True
            self.cancels.extend(job.rows())
            if job.rj.aborted:
                job.rj.stopped_rows.update(job.open_rows)
            self.finisher.finish(job.rj, [], 0.0)
        if not self.active:
            return None
        live = {row for job in self.active.values() for row in job.rows()}
        plan = StepPlan(self.batch, [(row, req) for row, req in self.waiting if row in live], self.cancels)
        self.cancels = []
        return plan

    def _admit_now(self) -> bool:
        """Whether to read the queue before this step: a submit woke the loop, rows left the batch
        since the last read, or ADMIT_POLL_S passed."""
        now = self.clock.time()
        woken = self.wakeup.take()
        if not (woken or self.rows_freed or now >= self.admit_due):
            return False
        self.rows_freed = False
        self.admit_due = now + ADMIT_POLL_S
        return True

    def _admit(self) -> list[Join]:
        rows = sum(len(job.open_rows) for job in self.active.values())
        tokens = sum(job.tokens for job in self.active.values())
        free = self.limits.max_batch_size - rows
        if free <= 0:
            return []
        chosen: list[QueueEntry] = []
        queue = self.store.queued(Lane.DECODER, max(64, self.limits.max_batch_size))
        for entry in fair_order(queue, self.turn):
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
        self.turn = chosen[0].owner
        costs = {e.job_id: e.cost_tokens for e in chosen}
        adds: list[Join] = []
        for rj in self.finisher.claim([e.job_id for e in chosen], self.clock.time(), Lane.DECODER):
            job = _ActiveJob(rj, self.input_ids.pop(rj.job.id, None), costs.get(rj.job.id, 0))
            self.active[rj.job.id] = job
            adds.extend(job.requests())
        return adds

    # -- execute: on the worker thread -----------------------------------------------------------
    def execute(self, plan: StepPlan) -> StepOutput:
        """Rows leave, rows join (those that do not fit yet wait), one decoder step, and more while
        nothing on the event loop needs to see them (``_undisturbed``)."""
        batch = plan.batch if plan.batch is not None else self.engine.decoder_batch()
        for row in plan.cancels:
            batch.cancel(row.engine_id)
        deferred: list[Join] = []
        rejected: dict[Row, EngineError] = {}
        for row, req in plan.adds:
            if deferred:  # keep queue order: nothing overtakes a row that is waiting for room
                deferred.append((row, req))
                continue
            try:
                if isinstance(req, _Pending):
                    req = GenerationRequest(
                        tuple(self.engine.tokenize([req.prompt])[0]), req.params, req.draw
                    )
                batch.add(row.engine_id, req)
                self.engine_rows[row.engine_id] = row
            except Overloaded:
                if not len(batch):
                    rejected[row] = InvalidRequest(
                        "this request needs more rows than our decoder's batch has; lower top_k"
                    )
                else:
                    deferred.append((row, req))
            except EngineError as exc:
                rejected[row] = exc
        events: list[RowEvent] = []
        start = time.perf_counter()
        while len(batch):
            t0 = time.perf_counter()
            rows = len(batch)
            step = self._row_events(batch.step())
            events.extend(step)
            self.metrics.inference.observe(time.perf_counter() - t0)
            self.metrics.batch_size.observe(rows)
            if rejected or not self._undisturbed(step, start):
                break
        return StepOutput(batch, events, deferred, rejected)

    def _undisturbed(self, step: list[RowEvent], start: float) -> bool:
        """On the worker thread, after a step (``step``: its events): whether the next step may
        run before the event loop sees this one (CHAIN_S)."""
        if time.perf_counter() - start >= CHAIN_S or any(ev.result is not None for ev in step):
            return False
        now = self.clock.time()
        if self.wakeup.pending() or now >= self.admit_due:
            return False
        watched = self.events.watched
        for job in self.active.values():
            rj = job.rj
            if rj.stop or not rj.first_token_seen or now > rj.deadline or rj.job.id in watched:
                return False
        return True

    def _row_events(self, events: list[TokenEvent]) -> list[RowEvent]:
        """The decoder's events, keyed by their rows again (a row's id is forgotten with its last
        event)."""
        out = []
        for ev in events:
            rows = self.engine_rows
            row = rows.pop(ev.request_id, None) if ev.result is not None else rows.get(ev.request_id)
            if row is not None:
                out.append(RowEvent(row, ev.token_id, ev.result, ev.logprob))
        return out

    # -- update: on the event loop ---------------------------------------------------------------
    def update(self, output: StepOutput) -> None:
        """Publish the step's tokens; finished jobs and jobs the decoder refused end."""
        self.batch = output.batch
        self.waiting = list(output.deferred)
        for row, refusal in output.rejected.items():
            refused = self.active.pop(row.job_id, None)
            if refused is not None:  # this job can never run here; its other rows leave too
                self.rows_freed = True
                self.cancels.extend(refused.rows())
                self.finisher.finish_failed(refused.rj, engine_error(refusal))
        for ev in output.events:
            job_id, prompt_index = ev.row.job_id, ev.row.prompt_index
            job = self.active.get(job_id)
            if job is None:
                continue  # a job that left between steps
            if ev.token_id >= 0:
                if not job.rj.first_token_seen:
                    self.finisher.first_token(job.rj)
                self.events.publish(ev.row, ev.token_id, ev.logprob)
            if ev.result is not None:
                job.results[prompt_index] = ev.result
                job.open_rows.discard(prompt_index)
                self.rows_freed = True
                if not job.open_rows:
                    del self.active[job_id]
                    results = [job.results[i] for i in range(len(job.rj.job.prompts))]
                    self.finisher.finish(job.rj, results, self.clock.time() - (job.rj.job.started_at or 0.0))
            if self.clock.time() > job.rj.deadline and not job.rj.stop:
                job.rj.timed_out = True
