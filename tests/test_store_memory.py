"""The SQLite store answers reads of queued jobs and claims from memory: what it returns must be
exactly what the database holds, in queue order, for jobs it enqueued and for jobs it found in the
file after a restart alike."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from engine.runtime.params import DecodingParams
from engine.serving.jobs import Job, JobError, JobStatus
from engine.serving.store.sqlite import _JOB_COLUMNS, SqliteJobStore, _job
from tests.stores import submission


def job(i: int, **params: object) -> Job:
    return Job(
        id=f"job-{i:03d}",
        owner="alice" if i % 2 else "bob",
        prompts=(f"prompt {i}", "second ü prompt") if i % 3 == 0 else (f"prompt {i}",),
        params=DecodingParams(**params),  # type: ignore[arg-type]
        created_at=1000.0 + i / 7,
        model="m" if i % 4 == 0 else None,
    )


def from_disk(path: Path, job_id: str) -> Job | None:
    """The job as a fresh connection reads it from the file (the store's lock keeps a second
    store off the file, so a plain connection reads it)."""
    con = sqlite3.connect(path)
    try:
        row = con.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _job(row)
    finally:
        con.close()


def test_reads_and_claims_from_memory_match_the_file_exactly(tmp_path: Path) -> None:
    db = tmp_path / "engine.db"
    store = SqliteJobStore(db)
    jobs = [job(i, max_new_tokens=8 + i, temperature=0.7, do_sample=i % 2 == 0) for i in range(12)]
    for j in jobs:
        store.enqueue(submission(j, 5))
    for j in jobs:
        assert store.get(j.id) == from_disk(db, j.id) == j
    store.cancel(jobs[3].id, 2000.0)
    assert store.fail(jobs[5].id, None, JobError("timeout", "too late"), 2000.0)
    for gone in (jobs[3], jobs[5]):
        got = store.get(gone.id)
        assert got is not None and got == from_disk(db, gone.id) and got.status.terminal
    # Out of order on purpose: a claim returns queue order; cancelled and failed jobs stay out.
    wanted = [jobs[9].id, jobs[3].id, jobs[1].id, jobs[5].id, jobs[7].id]
    claimed = store.claim(wanted, 3000.0)
    assert [j.id for j in claimed] == [jobs[1].id, jobs[7].id, jobs[9].id]
    for j in claimed:
        assert j.status is JobStatus.RUNNING and j.started_at == 3000.0 and j.attempts == 1
        assert j == from_disk(db, j.id) == store.get(j.id)
    assert store.position(jobs[11].id) == len(jobs) - 2 - 3 - 1  # 12 - cancelled/failed - claimed - itself
    store.close()


def test_jobs_found_in_the_file_after_a_restart_claim_the_same_as_new_ones(tmp_path: Path) -> None:
    db = tmp_path / "engine.db"
    first = SqliteJobStore(db)
    old = [job(i, max_new_tokens=4) for i in range(3)]
    for j in old:
        first.enqueue(submission(j, 3))
    first.close()
    store = SqliteJobStore(db)  # knows the old jobs only from the file
    new = [job(i, num_beams=2) for i in range(3, 6)]
    for j in new:
        store.enqueue(submission(j, 3))
    claimed = store.claim([j.id for j in reversed(old + new)], 50.0)
    assert [j.id for j in claimed] == [j.id for j in old + new]
    for j in claimed:
        assert j == from_disk(db, j.id)
        assert j.attempts == 1 and j.status is JobStatus.RUNNING
    # Requeued (e.g. its process stopped mid-run): read from the file again, attempts kept.
    assert store.requeue(claimed[4].id, 1)
    again = store.claim([claimed[4].id], 60.0)
    assert len(again) == 1 and again[0].attempts == 2 and again[0] == from_disk(db, claimed[4].id)
    store.close()
