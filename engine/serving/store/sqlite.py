"""The default job store: one SQLite file in WAL mode.

Queue order is an AUTOINCREMENT ``seq``; partial indexes over QUEUED rows make the queue's head
and a batch key's candidates cheap with 10,000 jobs queued, and an in-memory index of the queued
seqs answers positions and the depth without a COUNT. One connection, guarded by a lock, so that
any thread may call in; WAL checkpoints run on a thread of their own.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import fcntl
import functools
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine.errors import InvalidRequest, NotReady
from engine.runtime.params import DecodingParams
from engine.serving.batching import Lane, QueueEntry, batch_key_text
from engine.serving.jobs import Job, JobError, JobResult, JobStatus
from engine.serving.store.base import (
    LOG_EVERY_S,
    PURGE_BATCH,
    Completion,
    JobStore,
    LimitReached,
    QueueLoad,
    Replay,
    StoreHealth,
    Submission,
    decode_error,
    decode_result,
    encode_error,
    encode_result,
    per_owner,
    queue_entry,
    store_call,
    store_errors,
)
from engine.serving.store.url import DEFAULT_SQLITE_TIMEOUT_S

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    owner TEXT NOT NULL,
    prompts TEXT NOT NULL,
    params TEXT NOT NULL,
    model TEXT,
    status TEXT NOT NULL,
    lane TEXT NOT NULL,
    batch_key TEXT NOT NULL,
    num_prompts INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    max_new_tokens INTEGER NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    result TEXT,
    error TEXT,
    idempotency_key TEXT  -- the client's Idempotency-Key, unique per owner (NULL: none given)
);
CREATE INDEX IF NOT EXISTS jobs_queued_seq ON jobs(seq) WHERE status = 'queued';
CREATE INDEX IF NOT EXISTS jobs_queued_lane ON jobs(lane, batch_key, seq) WHERE status = 'queued';
CREATE INDEX IF NOT EXISTS jobs_queued_owner ON jobs(lane, owner, seq) WHERE status = 'queued';
CREATE INDEX IF NOT EXISTS jobs_queued_owner_key ON jobs(lane, owner, batch_key, seq) WHERE status = 'queued';
CREATE INDEX IF NOT EXISTS jobs_queued_created ON jobs(created_at) WHERE status = 'queued';
CREATE INDEX IF NOT EXISTS jobs_running ON jobs(id) WHERE status = 'running';
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs(finished_at) WHERE finished_at IS NOT NULL;
"""

# After the migration below (a database made before idempotency keys lacks the column).
IDEMPOTENCY_INDEX = """
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency ON jobs(owner, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
"""

_JOB_COLUMNS = (
    "id, owner, prompts, params, model, status, created_at, started_at, finished_at, attempts, result, error"
)
_ENTRY_COLUMNS = "id, seq, created_at, lane, batch_key, num_prompts, prompt_tokens, max_new_tokens, owner"
CHECKPOINT_EVERY_S = 0.5
_IN_CHUNK = 500  # ids per "IN (...)" statement: under SQLite's bound on a statement's variables
log = logging.getLogger(__name__)
_Q = JobStatus.QUEUED.value


# ``queued`` in one statement: for each owner with work in the lane (a JSON array, from the
# in-memory queue index), its oldest ``per_owner`` queued jobs, found by a seek into the
# (lane, owner[, batch_key], seq) index, merged oldest first. A window function (ROW_NUMBER()
# OVER (PARTITION BY owner ORDER BY seq)) would number every queued job of the lane on each read
# instead: see benchmarks/bench_store_queued.py.
def _queued_sql(key_filter: str) -> str:
    columns = ", ".join(f"j.{c}" for c in _ENTRY_COLUMNS.split(", "))
    return (
        f"SELECT {columns} FROM json_each(?) AS o JOIN jobs AS j ON j.seq IN"
        " (SELECT q.seq FROM jobs AS q WHERE q.status = 'queued' AND q.lane = ? AND q.owner = o.value"
        f"{key_filter} ORDER BY q.seq LIMIT ?) ORDER BY j.seq"
    )


_QUEUED_LANE = _queued_sql("")
_QUEUED_LANE_KEY = _queued_sql(" AND q.batch_key = ?")


class _QueueIndex:
    """The queued jobs' places, in memory: a position is a binary search and the depth a len(),
    instead of a COUNT over up to 10,000 index entries per read. It is exact because one server
    process owns a SQLite file (several servers share a queue through the Redis store instead).

    It also keeps the ``Job`` of each job that this process enqueued, for as long as it stays
    queued (every way out of the queue goes through ``remove``): a poll of a queued job and the
    claim of a batch read it here instead of decoding the row again (JSON and params validation
    per job, on the event loop, while a finished batch's clients wait for their answers).

    And which owners have queued jobs in each lane (for ``queued``'s turn per key), and the jobs
    and prompt tokens queued per owner and in all (``load``, for the limits)."""

    def __init__(self) -> None:
        self._seqs: list[int] = []  # sorted
        self._seq_of: dict[str, int] = {}
        self._jobs: dict[str, Job] = {}
        self._where: dict[str, tuple[str, str, int]] = {}  # job id -> (lane, owner, prompt tokens)
        self._owners: dict[str, dict[str, int]] = {}  # lane -> owner -> queued jobs
        self._owner_load: dict[str, tuple[int, int]] = {}  # owner -> (queued jobs, prompt tokens)
        self.tokens = 0  # prompt tokens of every queued job

    def add(self, job_id: str, seq: int, lane: str, owner: str, tokens: int, job: Job | None = None) -> None:
        if job_id not in self._seq_of:
            self._seq_of[job_id] = seq
            bisect.insort(self._seqs, seq)
            if job is not None:
                self._jobs[job_id] = job
            self._where[job_id] = (lane, owner, tokens)
            owners = self._owners.setdefault(lane, {})
            owners[owner] = owners.get(owner, 0) + 1
            jobs, held = self._owner_load.get(owner, (0, 0))
            self._owner_load[owner] = (jobs + 1, held + tokens)
            self.tokens += tokens

    def remove(self, job_id: str) -> None:
        seq = self._seq_of.pop(job_id, None)
        self._jobs.pop(job_id, None)
        if seq is not None:
            del self._seqs[bisect.bisect_left(self._seqs, seq)]
            lane, owner, tokens = self._where.pop(job_id)
            owners = self._owners[lane]
            owners[owner] -= 1
            if not owners[owner]:
                del owners[owner]
            jobs, held = self._owner_load[owner]
            if jobs == 1:
                del self._owner_load[owner]
            else:
                self._owner_load[owner] = (jobs - 1, held - tokens)
            self.tokens -= tokens

    def owners(self, lane: str) -> list[str]:
        """Owners with queued jobs in ``lane``."""
        return list(self._owners.get(lane, ()))

    def load(self, owner: str) -> QueueLoad:
        jobs, tokens = self._owner_load.get(owner, (0, 0))
        return QueueLoad(len(self._seqs), self.tokens, jobs, tokens)

    def position(self, job_id: str) -> int:
        seq = self._seq_of.get(job_id)
        return 0 if seq is None else bisect.bisect_left(self._seqs, seq)

    def position_known(self, job_id: str) -> bool:
        return job_id in self._seq_of

    def seq(self, job_id: str) -> int:
        return self._seq_of[job_id]

    def job(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def __len__(self) -> int:
        return len(self._seqs)


class SqliteJobStore(JobStore):
    """One server process per file: the store holds an exclusive lock (``<file>.lock``, with the
    holder's pid in it) from before it changes anything in the file until it closes, and a second
    server on the same file fails at once, naming the file and the first server's pid."""

    errors: tuple[type[BaseException], ...] = (sqlite3.Error,)

    def __init__(
        self, path: str | Path, *, synchronous: str = "normal", timeout_s: float = DEFAULT_SQLITE_TIMEOUT_S
    ) -> None:
        self.path = str(path)
        self._lock_file: int | None = None
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._lock_file = lock_database(self.path)
        self.health = StoreHealth(self.path, self._probe)
        self._timeout_ms = max(1, int(timeout_s * 1000))
        try:
            # Autocommit; multi-statement changes open their own transactions.
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
            # A write waits this long for another process's lock (``engine keys``, a backup), on
            # the event loop: bounded small, and a store that stays locked answers 503.
            self._db.execute(f"PRAGMA busy_timeout={self._timeout_ms}")
            self._db.executescript(SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
            if "idempotency_key" not in columns:
                self._db.execute("ALTER TABLE jobs ADD COLUMN idempotency_key TEXT")
            self._db.executescript(IDEMPOTENCY_INDEX)
            if self.path != ":memory:":
                # WAL checkpoints (and their fsyncs) would otherwise run inside every ~150th
                # submit's commit: a background thread does them instead, off the request path.
                self._db.execute("PRAGMA wal_autocheckpoint=0")
            self._queue = _QueueIndex()
            for job_id, *place in self._db.execute(
                "SELECT id, seq, lane, owner, prompt_tokens FROM jobs WHERE status = 'queued'"
            ):
                self._queue.add(job_id, *place)
        except sqlite3.Error as exc:
            self._unlock()
            raise NotReady(f"cannot open the job store {self.path}: {exc}") from exc
        self._lock = threading.Lock()
        self._group: list[str] = []  # deferred enqueues in the open transaction
        self._lost: set[str] = set()  # deferred enqueues whose commit failed
        self._closed = False
        self._stop_checkpoints = threading.Event()
        self._checkpointer: threading.Thread | None = None
        if self.path != ":memory:":
            self._checkpointer = threading.Thread(
                target=self._checkpoint_loop, name="sqlite-checkpoint", daemon=True
            )
            self._checkpointer.start()
            self.health.start()

    def _probe(self) -> None:
        """On the probe thread: can this store write? (a write lock taken and given back). Not
        while this process's own group of submits holds the lock until its commit, a loop turn
        later: that wait says nothing about the file, and would mark a busy store down."""
        if self._group:
            return
        con = sqlite3.connect(self.path, isolation_level=None, timeout=self._timeout_ms / 1000)
        try:
            con.execute("BEGIN IMMEDIATE")
            con.execute("ROLLBACK")
        finally:
            con.close()

    def _unlock(self) -> None:
        if self._lock_file is not None:
            os.close(self._lock_file)  # closing the descriptor releases the flock
            self._lock_file = None

    def _checkpoint_loop(self) -> None:
        con = sqlite3.connect(self.path, isolation_level=None)
        logged_at = -LOG_EVERY_S
        try:
            con.execute("PRAGMA busy_timeout=5000")
            while not self._stop_checkpoints.wait(CHECKPOINT_EVERY_S):
                try:
                    # PASSIVE: copies what it can without blocking readers or the writer.
                    con.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error as exc:
                    if time.monotonic() - logged_at >= LOG_EVERY_S:  # a full disk: not twice a second
                        logged_at = time.monotonic()
                        log.warning("WAL checkpoint of %s failed (%s); retrying", self.path, exc)
        finally:
            con.close()

    # -- helpers -------------------------------------------------------------------------------
    def _end_group(self) -> None:
        """With the lock held: commit the deferred enqueues, before anything else writes (their
        transaction is open on this connection). On failure they leave the queue and are lost."""
        if not self._group:
            return
        try:
            self._db.execute("COMMIT")
        except sqlite3.Error:
            self._end_group_failed()
            raise
        self._group = []

    def _one(self, sql: str, args: Sequence[Any] = ()) -> Any:
        with self._lock:
            return self._db.execute(sql, args).fetchone()

    def _change(self, sql: str, args: Sequence[Any]) -> int:
        with self._lock:
            self._end_group()
            return self._db.execute(sql, args).rowcount

    def _changed_one(self, sql: str, args: Sequence[Any]) -> bool:
        return self._change(sql, args) == 1

    # -- interface -----------------------------------------------------------------------------
    @store_call
    def enqueue(self, submission: Submission) -> QueueEntry:
        with self._lock:
            self._end_group()
            self._check_admission(submission)
            return self._insert(submission)

    @store_call
    def enqueue_deferred(self, submission: Submission) -> QueueEntry:
        job_id = submission.job.id
        with self._lock:
            # Sees the open group's rows too: a repeat within one group commit is a replay.
            self._check_admission(submission)
            if not self._group:
                self._db.execute("BEGIN")
            try:
                entry = self._insert(submission)
            except BaseException:
                # Whatever SQLite kept of the open transaction, none of it is trusted now.
                self._group.append(job_id)
                self._end_group_failed()
                raise
            self._group.append(job_id)
            return entry

    def _end_group_failed(self) -> None:
        group, self._group = self._group, []
        with contextlib.suppress(sqlite3.Error):
            self._db.execute("ROLLBACK")
        for job_id in group:
            self._queue.remove(job_id)
        self._lost.update(group)

    @store_errors
    def commit_deferred(self) -> None:
        with self._lock:
            self._end_group()

    def lost(self, job_id: str) -> bool:
        with self._lock:
            if job_id in self._lost:
                self._lost.discard(job_id)
                return True
            return False

    def _check_admission(self, submission: Submission) -> None:
        """With the lock held: ``Replay`` if the job's owner used its idempotency key for a job
        still stored, else ``LimitReached`` past a limit (the in-memory queue index is exact: one
        process a file)."""
        owner, limits = submission.job.owner, submission.limits
        if submission.idempotency_key is not None:
            earlier = self._idempotent(owner, submission.idempotency_key)
            if earlier is not None:
                raise Replay(earlier)
        if limits is not None:
            load = self._queue.load(owner)
            passed = limits.passed(load, submission.prompt_tokens)
            if passed is not None:
                raise LimitReached(passed, load)

    def _idempotent(self, owner: str, idempotency_key: str) -> str | None:
        row = self._db.execute(
            "SELECT id FROM jobs WHERE owner = ? AND idempotency_key = ?", (owner, idempotency_key)
        ).fetchone()
        return None if row is None else str(row[0])

    @store_call
    def find_idempotent(self, owner: str, idempotency_key: str) -> str | None:
        with self._lock:
            return self._idempotent(owner, idempotency_key)

    def _insert(self, submission: Submission) -> QueueEntry:
        """With the lock held: the INSERT, and the job's place in the in-memory queue."""
        job, lane, prompt_tokens = submission.job, submission.lane, submission.prompt_tokens
        params_json, key = _params_columns(job.params)
        row = (
            job.id,
            job.owner,
            json.dumps(list(job.prompts)),
            params_json,
            job.model,
            _Q,
            lane.value,
            key,
            len(job.prompts),
            prompt_tokens,
            job.params.max_new_tokens,
            job.created_at,
            job.attempts,
            submission.idempotency_key,
        )
        cur = self._db.execute(
            "INSERT INTO jobs (id, owner, prompts, params, model, status, lane, batch_key, num_prompts,"
            " prompt_tokens, max_new_tokens, created_at, attempts, idempotency_key)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            row,
        )
        seq = int(cur.lastrowid or 0)
        stored = job if job.status is JobStatus.QUEUED else job.with_status(JobStatus.QUEUED)
        self._queue.add(job.id, seq, lane.value, job.owner, prompt_tokens, stored)
        return queue_entry(submission, seq, key)

    @store_call
    def get(self, job_id: str) -> Job | None:
        with self._lock:
            queued = self._queue.job(job_id)
        if queued is not None:
            return queued
        row = self._one(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,))
        return None if row is None else _job(row)

    def position(self, job_id: str) -> int:
        with self._lock:
            return self._queue.position(job_id)

    def queue_depth(self) -> int:
        with self._lock:
            return len(self._queue)

    def load(self, owner: str) -> QueueLoad:
        with self._lock:
            return self._queue.load(owner)

    def still_queued(self, job_ids: Sequence[str]) -> set[str]:
        with self._lock:
            return {job_id for job_id in job_ids if self._queue.position_known(job_id)}

    @store_call
    def statuses(self, job_ids: Sequence[str]) -> dict[str, JobStatus]:
        ids = list(dict.fromkeys(job_ids))
        found: dict[str, JobStatus] = {}
        with self._lock:  # one statement per _IN_CHUNK ids (SQLite bounds a statement's variables)
            for start in range(0, len(ids), _IN_CHUNK):
                chunk = ids[start : start + _IN_CHUNK]
                marks = ",".join("?" * len(chunk))
                rows = self._db.execute(f"SELECT id, status FROM jobs WHERE id IN ({marks})", chunk)
                found.update((job_id, JobStatus(status)) for job_id, status in rows)
        return found

    @store_call
    def count(self, status: JobStatus) -> int:
        return int(self._one("SELECT COUNT(*) FROM jobs WHERE status = ?", (status.value,))[0])

    @store_call
    def queued(self, lane: Lane, limit: int, batch_key: str | None = None) -> list[QueueEntry]:
        with self._lock:
            owners = self._queue.owners(lane.value)
            if not owners:
                return []
            if len(owners) == 1:  # the usual case: the lane's head, as before there were turns
                where = "" if batch_key is None else " AND batch_key = ?"
                args = (lane.value,) if batch_key is None else (lane.value, batch_key)
                rows = self._db.execute(
                    f"SELECT {_ENTRY_COLUMNS} FROM jobs WHERE status = 'queued' AND lane = ?{where}"
                    " ORDER BY seq LIMIT ?",
                    (*args, limit),
                ).fetchall()
                return [_entry(r) for r in rows]
            each = per_owner(limit, len(owners))
            if batch_key is None:
                rows = self._db.execute(_QUEUED_LANE, (json.dumps(owners), lane.value, each)).fetchall()
            else:
                rows = self._db.execute(
                    _QUEUED_LANE_KEY, (json.dumps(owners), lane.value, batch_key, each)
                ).fetchall()
        return [_entry(r) for r in rows]

    @store_call
    def claim(self, job_ids: Sequence[str], now: float) -> list[Job]:
        if not job_ids:
            return []
        marks = ",".join("?" * len(job_ids))
        with self._lock:
            self._end_group()
            self._db.execute("BEGIN IMMEDIATE")
            try:
                ids = [
                    r[0]
                    for r in self._db.execute(
                        f"SELECT id FROM jobs WHERE status = 'queued' AND id IN ({marks})", tuple(job_ids)
                    )
                ]
                rows = []
                if ids:
                    got = ",".join("?" * len(ids))
                    self._db.execute(
                        f"UPDATE jobs SET status = 'running', started_at = ?, attempts = attempts + 1"
                        f" WHERE id IN ({got})",
                        (now, *ids),
                    )
                    # Only jobs that this process did not enqueue (taken up after a restart) are
                    # read back; the others are in memory exactly as stored.
                    unknown = [i for i in ids if self._queue.job(i) is None]
                    if unknown:
                        rows = self._db.execute(
                            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id IN ({','.join('?' * len(unknown))})",
                            tuple(unknown),
                        ).fetchall()
                self._db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise
            jobs = [_job(r) for r in rows]
            for job_id in ids:
                known = self._queue.job(job_id)
                if known is not None:
                    jobs.append(
                        known.with_status(JobStatus.RUNNING, started_at=now, attempts=known.attempts + 1)
                    )
            jobs.sort(key=lambda j: self._queue.seq(j.id))
            for job_id in ids:
                self._queue.remove(job_id)
        return jobs

    @store_call
    def complete(self, job_id: str, attempt: int, result: JobResult, now: float) -> bool:
        return self._changed_one(
            "UPDATE jobs SET status = 'completed', finished_at = ?, result = ?"
            " WHERE id = ? AND status = 'running' AND attempts = ?",
            (now, encode_result(result), job_id, attempt),
        )

    @store_call
    def complete_many(self, completions: Sequence[Completion], now: float) -> list[bool]:
        if not completions:
            return []
        rows = [(now, encode_result(c.result), c.job_id, c.attempt) for c in completions]
        with self._lock:
            self._end_group()
            self._db.execute("BEGIN IMMEDIATE")
            try:
                changed = [
                    self._db.execute(
                        "UPDATE jobs SET status = 'completed', finished_at = ?, result = ?"
                        " WHERE id = ? AND status = 'running' AND attempts = ?",
                        row,
                    ).rowcount
                    == 1
                    for row in rows
                ]
                self._db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise
        return changed

    @store_call
    def fail(self, job_id: str, attempt: int | None, error: JobError, now: float) -> bool:
        err = encode_error(error)
        if attempt is None:
            with self._lock:
                self._end_group()
                changed = self._db.execute(
                    "UPDATE jobs SET status = 'failed', finished_at = ?, error = ? WHERE id = ? AND status = 'queued'",
                    (now, err, job_id),
                ).rowcount
                if changed:
                    self._queue.remove(job_id)
            return changed == 1
        return self._changed_one(
            "UPDATE jobs SET status = 'failed', finished_at = ?, error = ?"
            " WHERE id = ? AND status = 'running' AND attempts = ?",
            (now, err, job_id, attempt),
        )

    @store_call
    def cancel(self, job_id: str, now: float) -> Job | None:
        with self._lock:
            self._end_group()
            self._db.execute(
                "UPDATE jobs SET status = 'cancelled', finished_at = ?"
                " WHERE id = ? AND status IN ('queued', 'running')",
                (now, job_id),
            )
            self._queue.remove(job_id)  # a no-op unless it was queued
            row = self._db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _job(row)

    @store_call
    def requeue(self, job_id: str, attempt: int) -> bool:
        with self._lock:
            self._end_group()
            row = self._db.execute(
                "UPDATE jobs SET status = 'queued', started_at = NULL"
                " WHERE id = ? AND status = 'running' AND attempts = ? RETURNING seq, lane, owner, prompt_tokens",
                (job_id, attempt),
            ).fetchone()
            if row is not None:
                self._queue.add(job_id, *row)
        return row is not None

    @store_call
    def reconcile(self, running_here: set[str]) -> list[str]:
        """One process per file: every RUNNING job that this process does not run is stranded."""
        with self._lock:
            rows = self._db.execute("SELECT id, attempts FROM jobs WHERE status = 'running'").fetchall()
        stranded = [(job_id, attempt) for job_id, attempt in rows if job_id not in running_here]
        return [job_id for job_id, attempt in stranded if self.requeue(job_id, attempt)]

    @store_call
    def requeue_running(self) -> list[str]:
        with self._lock:
            self._end_group()
            self._db.execute("BEGIN IMMEDIATE")
            try:
                rows = self._db.execute(
                    "SELECT id, seq, lane, owner, prompt_tokens FROM jobs WHERE status = 'running'"
                ).fetchall()
                self._db.execute(
                    "UPDATE jobs SET status = 'queued', started_at = NULL WHERE status = 'running'"
                )
                self._db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise
            for job_id, *place in rows:
                self._queue.add(job_id, *place)
        return [row[0] for row in rows]

    @store_call
    def queued_before(self, cutoff: float, limit: int = 1000) -> list[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id FROM jobs WHERE status = 'queued' AND created_at < ? ORDER BY created_at LIMIT ?",
                (cutoff, limit),
            ).fetchall()
        return [r[0] for r in rows]

    @store_call
    def purge_expired(self, now: float, ttl_s: float, limit: int = PURGE_BATCH) -> int:
        return self._change(
            "DELETE FROM jobs WHERE seq IN (SELECT seq FROM jobs WHERE finished_at IS NOT NULL"
            " AND finished_at < ? AND status IN ('completed', 'failed', 'cancelled') LIMIT ?)",
            (now - ttl_s, limit),
        )

    def ping(self) -> bool:
        return not self._closed and self.health.up

    def close(self) -> None:
        self._stop_checkpoints.set()
        self.health.stop()
        if self._checkpointer is not None and self._checkpointer is not threading.current_thread():
            self._checkpointer.join(timeout=5)
        with self._lock:
            if not self._closed:
                with contextlib.suppress(sqlite3.Error):
                    self._end_group()
                self._closed = True
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                self._db.close()
                self._unlock()


_PARAM_FIELDS = tuple(f.name for f in dataclasses.fields(DecodingParams))


def lock_database(path: str) -> int:
    """Take the exclusive lock of a SQLite job store (``<path>.lock``) for this process, or fail
    with an error that names the file and the process holding it. Returns the lock's descriptor."""
    lock_path = f"{path}.lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        finally:
            os.close(fd)
        raise InvalidRequest(
            f"the job store {path} is in use by another server (pid {holder}, lock {lock_path}); "
            "one server per SQLite file. To run several servers, share a Redis store "
            "(--store redis://host:6379/0); to run a second server here, give it its own --store file"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _params_dict(params: DecodingParams) -> dict[str, Any]:
    """``params.to_dict()`` without ``dataclasses.asdict``'s deep copy (every field is a
    scalar): a sixth of an enqueue's CPU."""
    return {name: getattr(params, name) for name in _PARAM_FIELDS}


@functools.lru_cache(maxsize=256)
def _params_columns(params: DecodingParams) -> tuple[str, str]:
    """(params as JSON, batch key text): the same for every job with these params, and clients
    tend to send the same few, so each submit need not encode them again."""
    return json.dumps(_params_dict(params)), batch_key_text(params)


def _entry(r: Sequence[Any]) -> QueueEntry:
    return QueueEntry(r[0], r[1], r[2], Lane(r[3]), r[4], r[5], r[6], r[7], r[8])


def _job(row: Sequence[Any]) -> Job:
    (job_id, owner, prompts, params, model, status, created, started, finished, attempts, result, error) = row
    return Job(
        id=job_id,
        owner=owner,
        prompts=tuple(json.loads(prompts)),
        params=DecodingParams(**json.loads(params)),
        status=JobStatus(status),
        created_at=created,
        started_at=started,
        finished_at=finished,
        attempts=attempts,
        model=model,
        result=None if result is None else decode_result(result),
        error=None if error is None else decode_error(error),
    )
