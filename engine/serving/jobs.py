"""Jobs: what the store keeps and what every transport returns, typed (never dicts or tuples)."""

from __future__ import annotations

import enum
import secrets
import time
from dataclasses import dataclass, field, fields

from engine.runtime.params import DecodingParams
from engine.runtime.result import TokenLogprob, Usage


class JobStatus(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)


def new_job_id() -> str:
    """Unguessable: 128 random bits, URL-safe."""
    return secrets.token_hex(16)


@dataclass(frozen=True)
class JobResult:
    completion: tuple[str, ...]  # one text per prompt
    token_ids: tuple[tuple[int, ...], ...]
    usage: Usage
    finish_reasons: tuple[str, ...] = ()
    usages: tuple[Usage, ...] = ()  # per prompt (usage is their sum)
    # Per prompt, one TokenLogprob per id of token_ids, when the job asked (params.logprobs);
    # () when it did not.
    logprobs: tuple[tuple[TokenLogprob, ...], ...] = ()


@dataclass(frozen=True)
class JobError:
    code: str  # an engine.errors code: "timeout", "job_failed", "prompt_too_long", ...
    message: str


@dataclass(frozen=True)
class Job:
    id: str
    owner: str  # the API key's name (never the key itself)
    prompts: tuple[str, ...]
    params: DecodingParams
    status: JobStatus = JobStatus.QUEUED
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0  # times it was claimed; > 1 after a restart re-ran it
    model: str | None = None
    result: JobResult | None = None
    error: JobError | None = None

    def with_status(self, status: JobStatus, **changes: object) -> Job:
        """A copy with ``status`` and ``changes``. Not ``dataclasses.replace``, which re-reads the
        fields and runs ``__init__``: a batch's claim and completion copy every job on the event
        loop, and ``replace`` was a fifth of that. Job has no validation to skip."""
        unknown = changes.keys() - _JOB_FIELDS
        if unknown:
            raise TypeError(f"Job has no field(s) {sorted(unknown)}")
        copy = object.__new__(Job)
        state = copy.__dict__
        state.update(self.__dict__)
        state["status"] = status
        state.update(changes)
        return copy


_JOB_FIELDS = frozenset(f.name for f in fields(Job))


@dataclass(frozen=True)
class JobView:
    """A job as a client sees it: the job plus its current queue position."""

    job: Job
    queue_position: int
