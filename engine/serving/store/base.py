"""The job store: the durable truth about every accepted job, behind a small interface.

Small on purpose so that a Redis implementation (for many machines) can follow the SQLite one:
every state change is one conditional transition (``claim`` only takes QUEUED jobs, ``complete``
only finishes a RUNNING job of the given attempt), which maps to one transaction or one script.
All methods are synchronous and fast (well under a millisecond on SQLite); the service calls them
from the event loop.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from urllib.parse import parse_qs, urlsplit

from engine.errors import InvalidRequest
from engine.serving.batching import Lane, QueueEntry
from engine.serving.jobs import Job, JobError, JobResult, JobStatus


class JobStore(abc.ABC):
    @abc.abstractmethod
    def enqueue(self, job: Job, prompt_tokens: int) -> QueueEntry:
        """Write a QUEUED job durably; it goes to the back of the queue."""

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
    def queued(self, lane: Lane, limit: int, batch_key: str | None = None) -> list[QueueEntry]:
        """Oldest queued jobs of a lane (and batch key), oldest first: the batching policy's input."""

    @abc.abstractmethod
    def claim(self, job_ids: Sequence[str], now: float) -> list[Job]:
        """QUEUED -> RUNNING (attempts + 1) for those of ``job_ids`` still queued, in queue order."""

    @abc.abstractmethod
    def complete(self, job_id: str, attempt: int, result: JobResult, now: float) -> bool:
        """RUNNING (this attempt) -> COMPLETED. False when it no longer is (cancelled, re-run):
        a stale worker's late result is dropped, so each job completes exactly once."""

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
    process crash, and only a power loss can lose the last ones)."""
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
    if parts.scheme == "redis":
        raise InvalidRequest(
            f"store URL {url!r}: the Redis job store is not part of this build yet; "
            "use sqlite:///./data/engine.db"
        )
    raise InvalidRequest(
        f"store URL {url!r} is not supported; use sqlite:///path/engine.db (or redis://host:port/db)"
    )
