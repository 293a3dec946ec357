"""A small in-memory stand-in for engine.serving.service.JobService with the same signatures, so
the REST and gRPC layers can be tested without a model. It "generates" one token per character:
the completion of a prompt is the prompt upper-cased, cut to max_new_tokens characters.

Prompts steer it: one containing FAIL makes the job fail (JobError "job_failed"), TIMEOUT fails
it with "timeout", HOLD keeps it running until ``release()``; a prompt longer than
``max_prompt_chars`` raises PromptTooLong.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace

from engine.api.auth import Authenticator, create_key
from engine.api.grpc_service import EngineServicer, ServerInfo
from engine.errors import InvalidRequest, NotFound, NotReady, Overloaded, PromptTooLong
from engine.metrics import Metrics
from engine.runtime.params import DecodingParams
from engine.runtime.result import FinishReason, Result, Usage
from engine.serving.events import Row, RowEvent
from engine.serving.jobs import Job, JobError, JobResult, JobStatus, JobView, new_job_id
from engine.serving.store.keys import SqliteKeyStore


def fake_decode(ids: Sequence[int]) -> str:
    return "".join(chr(i) for i in ids)


def fake_completion(prompt: str, params: DecodingParams) -> str:
    return prompt.upper()[: params.max_new_tokens]


@dataclass
class _Entry:
    job: Job
    events: list[RowEvent] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class FakeJobService:
    def __init__(
        self,
        *,
        max_queue_size: int = 100,
        max_prompts: int = 64,
        max_prompt_chars: int = 2000,
        token_delay_s: float = 0.0,
    ) -> None:
        self.max_queue_size = max_queue_size
        self.max_prompts = max_prompts
        self.max_prompt_chars = max_prompt_chars
        self.token_delay_s = token_delay_s
        self.is_ready = True
        self.paused = False  # jobs stay queued while paused
        self._jobs: dict[str, _Entry] = {}
        self._order: list[str] = []
        self._release = asyncio.Event()
        self._resume = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self.cancelled: list[str] = []
        self.idempotent: dict[tuple[str, str], str] = {}  # (owner, idempotency key) -> job id

    @property
    def ready(self) -> bool:
        return self.is_ready

    def release(self) -> None:
        self._release.set()

    def pause(self) -> None:
        self.paused = True
        self._resume.clear()

    def resume(self) -> None:
        self.paused = False
        self._resume.set()

    async def submit(
        self,
        owner: str,
        prompts: Sequence[str],
        params: DecodingParams,
        model: str | None = None,
        idempotency_key: str | None = None,
    ) -> JobView:
        if idempotency_key is not None and (owner, idempotency_key) in self.idempotent:
            return self._view(self.idempotent[owner, idempotency_key])
        if not self.is_ready:
            raise NotReady("the fake service is stopping")
        if not prompts:
            raise InvalidRequest("prompt must hold at least one prompt")
        if len(prompts) > self.max_prompts:
            raise InvalidRequest(f"at most {self.max_prompts} prompts per request, got {len(prompts)}")
        for i, p in enumerate(prompts):
            if len(p) > self.max_prompt_chars:
                raise PromptTooLong(
                    f"prompt {i} is {len(p)} tokens, {len(p) - self.max_prompt_chars} over the limit"
                )
        if self._queued_count() >= self.max_queue_size:
            raise Overloaded(f"the queue holds {self.max_queue_size} jobs", retry_after_s=2.5)
        job = Job(id=new_job_id(), owner=owner, prompts=tuple(prompts), params=params, model=model)
        self._jobs[job.id] = _Entry(job)
        self._order.append(job.id)
        if idempotency_key is not None:
            self.idempotent[owner, idempotency_key] = job.id
        task = asyncio.get_running_loop().create_task(self._run(job.id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return self._view(job.id)

    def _queued_count(self) -> int:
        return sum(1 for e in self._jobs.values() if e.job.status is JobStatus.QUEUED)

    def _view(self, job_id: str) -> JobView:
        job = self._jobs[job_id].job
        ahead = 0
        if job.status is JobStatus.QUEUED:
            for other in self._order:
                if other == job_id:
                    break
                if self._jobs[other].job.status is JobStatus.QUEUED:
                    ahead += 1
        return JobView(job, ahead)

    def _entry(self, owner: str, job_id: str) -> _Entry:
        entry = self._jobs.get(job_id)
        if entry is None or entry.job.owner != owner:
            raise NotFound(f"no job {job_id!r} for this key")
        return entry

    def _set(self, job_id: str, job: Job) -> None:
        entry = self._jobs[job_id]
        entry.job = job
        entry.changed.set()
        entry.changed = asyncio.Event()

    def _emit(self, job_id: str, event: RowEvent) -> None:
        entry = self._jobs[job_id]
        entry.events.append(event)
        entry.changed.set()
        entry.changed = asyncio.Event()

    async def _run(self, job_id: str) -> None:
        await asyncio.sleep(0)
        while self.paused:
            await self._resume.wait()
        # Jobs run one at a time, in order, as a real single-device service would.
        for other in self._order:
            if other == job_id:
                break
            while not self._jobs[other].job.status.terminal:
                await self._jobs[other].changed.wait()
        job = self._jobs[job_id].job
        if job.status is not JobStatus.QUEUED:
            return
        self._set(job_id, job.with_status(JobStatus.RUNNING, started_at=time.time(), attempts=1))
        if any("HOLD" in p for p in job.prompts):
            await self._release.wait()
        for code in ("FAIL", "TIMEOUT"):
            if any(code in p for p in job.prompts):
                error = JobError(
                    "job_failed" if code == "FAIL" else "timeout", f"the fake was told to {code}"
                )
                self._set(job_id, job.with_status(JobStatus.FAILED, finished_at=time.time(), error=error))
                return
        results = []
        for index, prompt in enumerate(job.prompts):
            text = fake_completion(prompt, job.params)
            ids = tuple(ord(c) for c in text)
            for token in ids:
                if self._jobs[job_id].job.status is JobStatus.CANCELLED:
                    return
                if self.token_delay_s:
                    await asyncio.sleep(self.token_delay_s)
                self._emit(job_id, RowEvent(Row(job_id, index), token))
            reason = FinishReason.LENGTH if len(ids) == job.params.max_new_tokens else FinishReason.EOS
            result = Result(text, ids, Usage(len(prompt) + 1, len(ids)), reason)
            results.append(result)
            self._emit(job_id, RowEvent(Row(job_id, index), -1, result))
        if self._jobs[job_id].job.status is JobStatus.CANCELLED:
            return
        usage = Usage(
            sum(r.usage.prompt_tokens for r in results), sum(r.usage.completion_tokens for r in results)
        )
        job_result = JobResult(
            completion=tuple(r.text for r in results),
            token_ids=tuple(r.token_ids for r in results),
            usage=usage,
            finish_reasons=tuple(r.finish_reason.value for r in results),
        )
        self._set(job_id, job.with_status(JobStatus.COMPLETED, finished_at=time.time(), result=job_result))

    async def get(self, owner: str, job_id: str) -> JobView:
        self._entry(owner, job_id)
        return self._view(job_id)

    async def cancel(self, owner: str, job_id: str) -> JobView:
        entry = self._entry(owner, job_id)
        if not entry.job.status.terminal:
            self.cancelled.append(job_id)
            self._set(job_id, replace(entry.job, status=JobStatus.CANCELLED, finished_at=time.time()))
        return self._view(job_id)

    async def wait(self, owner: str, job_id: str, timeout_s: float | None = None) -> JobView:
        entry = self._entry(owner, job_id)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not entry.job.status.terminal:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            try:
                await asyncio.wait_for(entry.changed.wait(), remaining)
            except TimeoutError:
                break
        return self._view(job_id)

    async def stream(self, owner: str, job_id: str) -> AsyncIterator[RowEvent]:
        entry = self._entry(owner, job_id)
        sent = 0
        while True:
            while sent < len(entry.events):
                yield entry.events[sent]
                sent += 1
            if entry.job.status.terminal:
                return
            await entry.changed.wait()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


INFO = ServerInfo(
    model="fake/flan-t5",
    random_weights=True,
    device="cpu",
    compute_type="int8",
    auth_required=True,
)


@dataclass
class FakeStack:
    service: FakeJobService
    servicer: EngineServicer
    metrics: Metrics
    keys: SqliteKeyStore
    alice: str
    bob: str


def fake_stack(
    tmp_db: str, *, rate_limit_per_minute: int = 0, info: ServerInfo | None = None, **service_kwargs: object
) -> FakeStack:
    """A servicer over a FakeJobService with two keys, alice and bob, in a SQLite key store."""
    keys = SqliteKeyStore(tmp_db)
    alice = create_key(keys, "alice")
    bob = create_key(keys, "bob")
    metrics = Metrics()
    service = FakeJobService(**service_kwargs)  # type: ignore[arg-type]
    auth = Authenticator(keys, rate_limit_per_minute=rate_limit_per_minute)
    servicer = EngineServicer(service, auth, info or INFO, metrics=metrics, decode=fake_decode)
    return FakeStack(service, servicer, metrics, keys, alice, bob)


@contextlib.asynccontextmanager
async def open_stack(
    tmp_db: str, *, rate_limit_per_minute: int = 0, info: ServerInfo | None = None, **service_kwargs: object
) -> AsyncIterator[FakeStack]:
    """``fake_stack`` for the length of an ``async with``: its job service and key store closed after."""
    stack = fake_stack(tmp_db, rate_limit_per_minute=rate_limit_per_minute, info=info, **service_kwargs)
    try:
        yield stack
    finally:
        await stack.service.close()
        stack.keys.close()


# A real `engine serve` subprocess: harness/processes.py (benchmarks use it too).
