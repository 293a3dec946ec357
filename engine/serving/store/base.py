"""The job store: the durable truth about every accepted job, behind a small interface.

Small on purpose so that a Redis implementation (for many machines) can follow the SQLite one:
every state change is one conditional transition (``claim`` only takes QUEUED jobs, ``complete``
only finishes a RUNNING job of the given attempt), which maps to one transaction or one script.
All methods are synchronous and fast (well under a millisecond on SQLite); the service calls them
from the event loop. So that a store outage never stalls the loop, every call is bounded by the
store's timeouts (``timeout_s`` in the URL), and once a call has failed the store is marked down
and calls fail at once (NotReady, a generic message) until a probe on a thread of its own sees it
answer again (``StoreHealth``).
"""

from __future__ import annotations

import abc
import functools
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, cast

from engine.errors import NotReady
from engine.runtime.result import TokenLogprob, Usage
from engine.serving.batching import Lane, QueueEntry
from engine.serving.jobs import Job, JobError, JobResult, JobStatus
from engine.serving.store.url import StoreUrl, parse_store_url, redact_text

log = logging.getLogger(__name__)
PURGE_BATCH = 500  # finished jobs deleted per purge call: each call stays well within a timeout


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


@dataclass(frozen=True)
class QueueLimits:
    """The queue's limits (Config's names), which ``enqueue`` checks atomically with the write,
    so that servers sharing a store cannot pass them together."""

    max_queue_size: int  # jobs
    max_queued_tokens: int  # prompt tokens
    max_queued_jobs_per_key: int
    max_queued_tokens_per_key: int

    def passed(self, load: QueueLoad, tokens: int) -> str | None:
        """The limit that one more job of ``tokens`` prompt tokens would pass, if any (first of the
        server's, then the key's)."""
        if load.jobs >= self.max_queue_size:
            return "max_queue_size"
        if load.tokens + tokens > self.max_queued_tokens:
            return "max_queued_tokens"
        if load.owner_jobs >= self.max_queued_jobs_per_key:
            return "max_queued_jobs_per_key"
        if load.owner_tokens + tokens > self.max_queued_tokens_per_key:
            return "max_queued_tokens_per_key"
        return None


@dataclass(frozen=True)
class Submission:
    """One job to queue: what ``JobStore.enqueue`` writes, and what it checks atomically with the
    write (the idempotency key's earlier use, the queue's limits)."""

    job: Job
    prompt_tokens: int  # over all its prompts (what the token limits count)
    lane: Lane  # the loop that will run it: the server's choice (``lane_of`` with its greedy_lane)
    idempotency_key: str | None = None  # the client's Idempotency-Key, unique per ``job.owner``
    limits: QueueLimits | None = None  # None: no limit is checked


class LimitReached(Exception):
    """``enqueue`` refused: one more job would pass ``limit`` (a QueueLimits field); ``load`` is
    what was queued."""

    def __init__(self, limit: str, load: QueueLoad) -> None:
        super().__init__(limit)
        self.limit = limit
        self.load = load


class Replay(Exception):
    """``enqueue`` with an idempotency key that the owner already used: ``job_id`` is that job."""

    def __init__(self, job_id: str) -> None:
        super().__init__(job_id)
        self.job_id = job_id


class JobStore(abc.ABC):
    # Whether other server processes may share this store (Redis) and so change the jobs that
    # this one runs (cancel them). On a store that only this process uses (SQLite: one process a
    # file), a cancel reaches the running job directly and nothing needs to be read back.
    shared: bool = False

    @abc.abstractmethod
    def enqueue(self, submission: Submission) -> QueueEntry:
        """Write ``submission.job`` durably, QUEUED on ``submission.lane``; it goes to the back of
        the queue. With an ``idempotency_key`` that ``job.owner`` used for a job the store still
        holds, nothing is written and ``Replay`` names that job; else, past one of ``limits``,
        nothing is written and ``LimitReached`` names it. Both are checked atomically with the
        write, across servers."""

    @abc.abstractmethod
    def find_idempotent(self, owner: str, idempotency_key: str) -> str | None:
        """The id of the job ``owner`` submitted with this key, while the store holds it."""

    def enqueue_deferred(self, submission: Submission) -> QueueEntry:
        """``enqueue`` whose commit may wait for ``commit_deferred``, so that the submits that
        arrive together share one commit. The job is queued at once (positions, depth, claims
        see it) but durable only once ``commit_deferred`` has returned and ``lost(job.id)`` is
        False: a submit is answered only then. Stores whose every write is durable at once keep
        this default."""
        return self.enqueue(submission)

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
    def statuses(self, job_ids: Sequence[str]) -> dict[str, JobStatus]:
        """The stored status of each of ``job_ids`` that the store holds (an id it does not hold:
        purged, never committed, is left out), read in one round trip however many there are."""

    def ended(self, job_ids: Sequence[str]) -> set[str]:
        """Those of ``job_ids`` that are terminal or gone (purged, never committed), in one round
        trip: the watch of jobs that another server sharing the store runs
        (engine/serving/remote_ends.py) asks this every tick."""
        found = self.statuses(job_ids)
        return {job_id for job_id in job_ids if job_id not in found or found[job_id].terminal}

    def cancelled(self, job_ids: Sequence[str]) -> set[str]:
        """Those of ``job_ids`` that are CANCELLED, in one round trip: on a ``shared`` store, the
        scheduler asks this every second of the jobs it runs (another server may cancel them)."""
        return {job_id for job_id, status in self.statuses(job_ids).items() if status is JobStatus.CANCELLED}

    @abc.abstractmethod
    def queued(self, lane: Lane, limit: int, batch_key: str | None = None) -> list[QueueEntry]:
        """The batching policy's input: the oldest queued jobs of a lane (and batch key) of each
        owner that has some, merged oldest first, so that a key whose backlog is older than the
        window still shows every other key's head (batching.fair_order takes turns). Each owner
        gives ``per_owner(limit, owners)`` jobs: ``limit`` while few keys have work, fewer (at
        least its head) when many do, so that a read stays about ``4 * limit`` jobs."""

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

    def reconcile(self, running_here: set[str]) -> list[str]:
        """Called every second or so with the ids of the jobs this process runs: a job RUNNING in
        the store that no loop of this process runs (a store failure interrupted its end: its
        completion or its requeue could not be written) goes back to the queue, so that it is
        retried or fails within job_timeout_s. Returns the ids it let go."""
        return []

    @abc.abstractmethod
    def requeue_running(self) -> list[str]:
        """On start: every RUNNING job (its worker died with the last process) -> QUEUED at its old
        place, attempts kept. Single-process stores only; a shared store needs leases instead."""

    @abc.abstractmethod
    def queued_before(self, cutoff: float, limit: int = 1000) -> list[str]:
        """Ids of queued jobs enqueued before ``cutoff`` (for job_timeout_s)."""

    @abc.abstractmethod
    def purge_expired(self, now: float, ttl_s: float, limit: int = PURGE_BATCH) -> int:
        """Delete up to ``limit`` finished jobs older than ``ttl_s``; returns how many. One call is
        bounded (a day of results purged at once could outlast the store's timeout); call again
        while it returns ``limit``."""

    @abc.abstractmethod
    def ping(self) -> bool:
        """True when the store answers."""

    @abc.abstractmethod
    def close(self) -> None: ...


def open_store(url: str | StoreUrl) -> JobStore:
    """The job store of a store URL (engine.serving.store.url has the forms and options)."""
    parsed = parse_store_url(url)
    if parsed.is_sqlite:
        from engine.serving.store.sqlite import SqliteJobStore

        return SqliteJobStore(parsed.path, synchronous=parsed.synchronous, timeout_s=parsed.timeout_s)
    from engine.serving.store.redis import RedisJobStore

    return RedisJobStore(parsed)


# -- failures: one message for clients, throttled logs, fail fast while the store is down ---------
RETRY_AFTER_S = 1.0
PROBE_EVERY_S = 1.0  # how often a store that answers is checked (readiness), off the event loop
PROBE_DOWN_EVERY_S = 0.25  # ... and one that does not (how soon it is used again)
LOG_EVERY_S = 10.0


class StoreHealth:
    """Whether a store answers, known without asking it on the event loop.

    A failed call marks the store down: until a probe (on a thread of its own, with the store's
    timeouts) succeeds, calls fail at once with NotReady instead of each waiting for a timeout on
    the event loop. Failures are logged at most once per ``LOG_EVERY_S`` (a store outage under
    load would otherwise write a line per request), with the store's redacted URL, never the
    client's message or the URL's password."""

    def __init__(self, shown: str, probe: Callable[[], object], *, what: str = "job store") -> None:
        self.shown = shown
        self.what = what  # "job store", "key store": what the logs and the 503 name
        self._probe = probe
        self._down_since: float | None = None
        self._logged_at = -math.inf
        self._failures = 0
        self._logged_down = False  # the last failure was logged: log the recovery too
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._probe_loop, name="store-probe", daemon=True)
        self._thread.start()

    @property
    def up(self) -> bool:
        return self._down_since is None

    def check(self) -> None:
        if self._down_since is not None:
            raise NotReady(f"the {self.what} is unavailable; retry in a moment", retry_after_s=RETRY_AFTER_S)

    def failed(self, exc: BaseException) -> NotReady:
        """Mark the store down; the NotReady to raise (its message says nothing of the store)."""
        now = time.monotonic()
        with self._lock:
            self._failures += 1
            if self._down_since is None and self._thread is not None:  # a probe will clear it
                self._down_since = now
            if now - self._logged_at >= LOG_EVERY_S:
                self._logged_at = now
                self._logged_down = True
                log.warning(
                    "the %s %s failed (%d failure(s) so far; %s: %s); calls answer 503 until "
                    "it answers again",
                    self.what,
                    self.shown,
                    self._failures,
                    type(exc).__name__,
                    redact_text(str(exc)),
                )
        return NotReady(f"the {self.what} is unavailable; retry in a moment", retry_after_s=RETRY_AFTER_S)

    def _probe_loop(self) -> None:
        while not self._stop.wait(PROBE_EVERY_S if self._down_since is None else PROBE_DOWN_EVERY_S):
            try:
                self._probe()
            except Exception as exc:
                if self._down_since is None:
                    self.failed(exc)
                continue
            with self._lock:
                if self._down_since is not None:
                    if self._logged_down:  # a store that flaps logs twice per LOG_EVERY_S at most
                        log.warning(
                            "the %s %s answers again (down %.1f s)",
                            self.what,
                            self.shown,
                            time.monotonic() - self._down_since,
                        )
                        self._logged_down = False
                    self._down_since = None
                    self._failures = 0

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)


class _Guarded(Protocol):
    health: StoreHealth
    errors: tuple[type[BaseException], ...]


F = TypeVar("F", bound=Callable[..., Any])


def store_call(method: F) -> F:
    """A store method: fails at once while the store is down, and turns the store's own errors
    into NotReady (503 / UNAVAILABLE at the edges) with a message that names nothing of the store."""

    @functools.wraps(method)
    def wrapper(self: _Guarded, *args: Any, **kwargs: Any) -> Any:
        self.health.check()
        try:
            return method(self, *args, **kwargs)
        except self.errors as exc:
            raise self.health.failed(exc) from exc

    return cast(F, wrapper)


def store_errors(method: F) -> F:
    """``store_call`` without failing fast: for the calls that must reach the store even while it
    is marked down (the commit of submits already written, which rolls them back if it fails)."""

    @functools.wraps(method)
    def wrapper(self: _Guarded, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except self.errors as exc:
            raise self.health.failed(exc) from exc

    return cast(F, wrapper)


def queue_entry(submission: Submission, seq: int, batch_key: str) -> QueueEntry:
    """What ``enqueue`` returns for ``submission`` at queue place ``seq``."""
    job = submission.job
    return QueueEntry(
        job.id,
        seq,
        job.created_at,
        submission.lane,
        batch_key,
        len(job.prompts),
        submission.prompt_tokens,
        job.params.max_new_tokens,
        job.owner,
    )


def per_owner(limit: int, owners: int) -> int:
    """How many queued jobs ``JobStore.queued`` reads of each of ``owners`` keys with work."""
    return max(1, min(limit, 4 * limit // max(1, owners)))


# -- JSON forms of results and errors, shared by the stores ---------------------------------------
def encode_result(result: JobResult) -> str:
    fields: dict[str, Any] = {
        "completion": list(result.completion),
        "token_ids": [list(t) for t in result.token_ids],
        "usage": [result.usage.prompt_tokens, result.usage.completion_tokens],
        "finish_reasons": list(result.finish_reasons),
        "usages": [[u.prompt_tokens, u.completion_tokens] for u in result.usages],
    }
    if result.logprobs:
        # Per prompt, per token: [id, logprob, [[id, logprob], ...]] (JSON floats keep a double).
        fields["logprobs"] = [
            [[t.token_id, t.logprob, [list(a) for a in t.top]] for t in row] for row in result.logprobs
        ]
    return json.dumps(fields)


def decode_result(text: str) -> JobResult:
    r = json.loads(text)
    return JobResult(
        completion=tuple(r["completion"]),
        token_ids=tuple(tuple(t) for t in r["token_ids"]),
        usage=Usage(*r["usage"]),
        finish_reasons=tuple(r["finish_reasons"]),
        usages=tuple(Usage(*u) for u in r["usages"]),
        logprobs=tuple(
            tuple(TokenLogprob(t[0], t[1], tuple((a[0], a[1]) for a in t[2])) for t in row)
            for row in r.get("logprobs", ())
        ),
    )


def encode_error(error: JobError) -> str:
    return json.dumps({"code": error.code, "message": error.message})


def decode_error(text: str) -> JobError:
    e = json.loads(text)
    return JobError(code=e["code"], message=e["message"])
