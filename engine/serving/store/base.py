"""The job store: the durable truth about every accepted job, behind a small interface.

Small on purpose so that a Redis implementation (for many machines) can follow the SQLite one:
every state change is one conditional transition (``claim`` only takes QUEUED jobs, ``complete``
only finishes a RUNNING job of the given attempt), which maps to one transaction or one script.
All methods are synchronous and fast (well under a millisecond on SQLite); the service calls them
from the event loop.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from engine.errors import InvalidRequest
from engine.runtime.result import Usage
from engine.serving.batching import Lane, QueueEntry
from engine.serving.jobs import Job, JobError, JobResult, JobStatus


@dataclass(frozen=True)
class Completion:
    """One job's result, for ``JobStore.complete_many``."""

    job_id: str
    attempt: int
    result: JobResult


@dataclass(frozen=True)
class QueueLoad:
    """What is queued, in all and for one owner (API key): what the service's limits look at."""

    jobs: int
    tokens: int  # prompt tokens
    owner_jobs: int
    owner_tokens: int


class Replay(Exception):
    """``enqueue`` with an idempotency key that the owner already used: ``job_id`` is that job."""

    def __init__(self, job_id: str) -> None:
        super().__init__(job_id)
        self.job_id = job_id


class JobStore(abc.ABC):
    @abc.abstractmethod
    def enqueue(self, job: Job, prompt_tokens: int, idempotency_key: str | None = None) -> QueueEntry:
        """Write a QUEUED job durably; it goes to the back of the queue. With an
        ``idempotency_key`` that ``job.owner`` used for a job the store still holds, nothing is
        written and ``Replay`` names that job (checked and recorded atomically, across servers)."""

    @abc.abstractmethod
    def find_idempotent(self, owner: str, idempotency_key: str) -> str | None:
        """The id of the job ``owner`` submitted with this key, while the store holds it."""

    def enqueue_deferred(
        self, job: Job, prompt_tokens: int, idempotency_key: str | None = None
    ) -> QueueEntry:
        """``enqueue`` whose commit may wait for ``commit_deferred``, so that the submits that
        arrive together share one commit. The job is queued at once (positions, depth, claims
        see it) but durable only once ``commit_deferred`` has returned and ``lost(job.id)`` is
        False: a submit is answered only then. Stores whose every write is durable at once keep
        this default."""
        return self.enqueue(job, prompt_tokens, idempotency_key)

    def commit_deferred(self) -> None:
        """Make every deferred enqueue durable. On failure the deferred jobs leave the queue, are
        reported by ``lost`` and this raises NotReady."""
        return None  # every write of this store is durable at once

    def lost(self, job_id: str) -> bool:
        """Whether a deferred enqueue of ``job_id`` failed to commit (asked once per job)."""
        return False

    @abc.abstractmethod
    def get(self, job_id: str) -> Job | None: ...

    @abc.abstractmethod
    def position(self, job_id: str) -> int:
        """Queued jobs ahead of this one (any lane); 0 for the next, a running or a finished job."""

    @abc.abstractmethod
    def queue_depth(self) -> int:
        """Jobs waiting (QUEUED)."""

    @abc.abstractmethod
    def count(self, status: JobStatus) -> int: ...

    @abc.abstractmethod
    def load(self, owner: str) -> QueueLoad:
        """Queued jobs and their prompt tokens, in all and of ``owner`` (one consistent read)."""

    @abc.abstractmethod
    def still_queued(self, job_ids: Sequence[str]) -> set[str]:
        """Those of ``job_ids`` that are queued now (the rest ended, or another server took them)."""

    @abc.abstractmethod
    def queued(self, lane: Lane, limit: int, batch_key: str | None = None) -> list[QueueEntry]:
        """The batching policy's input: the oldest ``limit`` queued jobs of a lane (and batch key)
        of each owner that has some, merged oldest first, so that a key whose backlog is older
        than the window still shows every other key's head (batching.fair_order takes turns)."""

    @abc.abstractmethod
    def claim(self, job_ids: Sequence[str], now: float) -> list[Job]:
        """QUEUED -> RUNNING (attempts + 1) for those of ``job_ids`` still queued, in queue order."""

    @abc.abstractmethod
    def complete(self, job_id: str, attempt: int, result: JobResult, now: float) -> bool:
        """RUNNING (this attempt) -> COMPLETED. False when it no longer is (cancelled, re-run):
        a stale worker's late result is dropped, so each job completes exactly once."""

    def complete_many(self, completions: Sequence[Completion], now: float) -> list[bool]:
        """``complete`` for each of a finished batch's jobs; a store that can makes it one
        transaction (one commit per batch instead of one per job). Returns ``complete``'s answer
        per job, in order."""
        return [self.complete(c.job_id, c.attempt, c.result, now) for c in completions]

    @abc.abstractmethod
    def fail(self, job_id: str, attempt: int | None, error: JobError, now: float) -> bool:
        """-> FAILED: a RUNNING job of ``attempt``, or (``attempt`` None) a QUEUED one."""

    @abc.abstractmethod
    def cancel(self, job_id: str, now: float) -> Job | None:
        """QUEUED or RUNNING -> CANCELLED; a finished job is returned unchanged; None if unknown."""

    @abc.abstractmethod
    def requeue(self, job_id: str, attempt: int) -> bool:
        """RUNNING (this attempt) -> QUEUED at its old place (graceful shutdown that could not finish)."""

    @abc.abstractmethod
    def requeue_running(self) -> list[str]:
        """On start: every RUNNING job (its worker died with the last process) -> QUEUED at its old
        place, attempts kept. Single-process stores only; a shared store needs leases instead."""

    @abc.abstractmethod
    def queued_before(self, cutoff: float, limit: int = 1000) -> list[str]:
        """Ids of queued jobs enqueued before ``cutoff`` (for job_timeout_s)."""

    @abc.abstractmethod
    def purge_expired(self, now: float, ttl_s: float) -> int:
        """Delete finished jobs older than ``ttl_s``; returns how many."""

    @abc.abstractmethod
    def ping(self) -> bool:
        """True when the store answers."""

    @abc.abstractmethod
    def close(self) -> None: ...


def open_store(url: str) -> JobStore:
    """``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db``, ``sqlite:///:memory:``;
    option ``?synchronous=full`` fsyncs every commit (default ``normal``: a commit survives a
    process crash, and only a power loss can lose the last ones). Or ``redis://host:port/db``
    (options ``lease_s``, ``prefix``) for several servers sharing one queue."""
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        from engine.serving.store.sqlite import SqliteJobStore

        if parts.netloc:
            raise InvalidRequest(
                f"store URL {url!r}: a SQLite URL has no host; use sqlite:///relative/path.db "
                "or sqlite:////absolute/path.db"
            )
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        if not path:
            raise InvalidRequest(f"store URL {url!r} names no database file, e.g. sqlite:///./data/engine.db")
        options = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        unknown = sorted(set(options) - {"synchronous"})
        if unknown:
            raise InvalidRequest(
                f"store URL {url!r}: unknown option(s) {', '.join(unknown)}; known: synchronous"
            )
        synchronous = options.get("synchronous", "normal").lower()
        if synchronous not in ("normal", "full"):
            raise InvalidRequest(
                f"store URL {url!r}: synchronous must be normal or full, got {synchronous!r}"
            )
        return SqliteJobStore(path, synchronous=synchronous)
    if parts.scheme in ("redis", "rediss"):
        from engine.serving.store.redis import DEFAULT_LEASE_S, DEFAULT_PREFIX, RedisJobStore

        options = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        unknown = sorted(set(options) - {"lease_s", "prefix"})
        if unknown:
            raise InvalidRequest(
                f"store URL {url!r}: unknown option(s) {', '.join(unknown)}; known: lease_s, prefix"
            )
        try:
            lease_s = float(options.get("lease_s", DEFAULT_LEASE_S))
        except ValueError:
            lease_s = -1.0
        if not lease_s > 0:
            raise InvalidRequest(f"store URL {url!r}: lease_s must be a positive number of seconds")
        # The client gets the URL without our options (redis-py would reject them).
        client_url = parts._replace(query="").geturl()
        return RedisJobStore(client_url, prefix=options.get("prefix", DEFAULT_PREFIX), lease_s=lease_s)
    raise InvalidRequest(
        f"store URL {url!r} is not supported; use sqlite:///path/engine.db (or redis://host:port/db)"
    )


def queue_entry(job: Job, seq: int, lane: Lane, batch_key: str, prompt_tokens: int) -> QueueEntry:
    """What ``enqueue`` returns for ``job`` at queue place ``seq``."""
    return QueueEntry(
        job.id,
        seq,
        job.created_at,
        lane,
        batch_key,
        len(job.prompts),
        prompt_tokens,
        job.params.max_new_tokens,
        job.owner,
    )


# -- JSON forms of results and errors, shared by the stores ---------------------------------------
def encode_result(result: JobResult) -> str:
    return json.dumps(
        {
            "completion": list(result.completion),
            "token_ids": [list(t) for t in result.token_ids],
            "usage": [result.usage.prompt_tokens, result.usage.completion_tokens],
            "finish_reasons": list(result.finish_reasons),
            "usages": [[u.prompt_tokens, u.completion_tokens] for u in result.usages],
        }
    )


def decode_result(text: str) -> JobResult:
    r = json.loads(text)
    return JobResult(
        completion=tuple(r["completion"]),
        token_ids=tuple(tuple(t) for t in r["token_ids"]),
        usage=Usage(*r["usage"]),
        finish_reasons=tuple(r["finish_reasons"]),
        usages=tuple(Usage(*u) for u in r["usages"]),
    )


def encode_error(error: JobError) -> str:
    return json.dumps({"code": error.code, "message": error.message})


def decode_error(text: str) -> JobError:
    e = json.loads(text)
    return JobError(code=e["code"], message=e["message"])
