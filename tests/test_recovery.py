"""Durability with real processes: SIGKILL mid-work loses no accepted job and completes each once;
SIGTERM drains the running batch and keeps the queue."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from engine.serving.jobs import JobStatus
from engine.serving.store.sqlite import SqliteJobStore
from harness.fakes import expected_tokens, fake_tokenize

ROOT = Path(__file__).resolve().parent.parent
HARNESS = ROOT / "scripts" / "serving_harness.py"


def start(db: Path, log: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(HARNESS), "--db", str(db), "--log", str(log), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def read_until_submitted(proc: subprocess.Popen[str]) -> dict[str, str]:
    """Job id -> prompt for every job the process accepted."""
    accepted: dict[str, str] = {}
    assert proc.stdout is not None
    for line in proc.stdout:
        msg = json.loads(line)
        if "accepted" in msg:
            accepted[msg["accepted"]] = msg["prompt"]
        if "submitted" in msg:
            return accepted
    raise AssertionError(
        f"harness ended before submitting: {proc.wait()} {proc.stderr and proc.stderr.read()}"
    )


def statuses(db: Path) -> Counter[str]:
    con = sqlite3.connect(db, timeout=5)
    try:
        return Counter(dict(con.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()))
    finally:
        con.close()


def snapshot(db: Path) -> dict[str, tuple[str, int, float | None]]:
    con = sqlite3.connect(db, timeout=5)
    try:
        rows = con.execute("SELECT id, status, attempts, finished_at FROM jobs").fetchall()
    finally:
        con.close()
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def wait_for(predicate: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def finish_in_second_process(db: Path, log: Path) -> None:
    second = start(db, log, "--exit-when-done")
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0, err
    assert '"stopped"' in out


def check_all_completed(db: Path, accepted: dict[str, str]) -> dict[str, int]:
    store = SqliteJobStore(db)
    try:
        attempts = {}
        for job_id, prompt in accepted.items():
            job = store.get(job_id)
            assert job is not None, f"accepted job {job_id} is missing"
            assert job.status is JobStatus.COMPLETED, (job_id, job.status, job.error)
            assert job.result is not None
            assert list(job.result.token_ids[0]) == expected_tokens(fake_tokenize(prompt), 10)
            attempts[job_id] = job.attempts
        assert store.count(JobStatus.QUEUED) == store.count(JobStatus.RUNNING) == 0
        return attempts
    finally:
        store.close()


def test_sigkill_while_jobs_run_and_wait_loses_nothing_and_completes_each_once(tmp_path: Path) -> None:
    db, log = tmp_path / "engine.db", tmp_path / "completions.log"
    first = start(db, log, "--submit", "24", "--step-delay-s", "0.02")
    try:
        accepted = read_until_submitted(first)
        assert len(accepted) == 24

        def mid_work() -> bool:
            s = statuses(db)
            return s["completed"] >= 4 and s["running"] >= 1 and s["queued"] >= 1

        wait_for(mid_work, "some jobs completed, some running, some queued")
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    finally:
        if first.poll() is None:
            first.kill()
        if first.stdout is not None:
            first.stdout.close()
        if first.stderr is not None:
            first.stderr.close()
    at_kill = snapshot(db)
    assert set(at_kill) == set(accepted)  # every accepted job was stored before submit returned
    running_at_kill = {j for j, (s, _, _) in at_kill.items() if s == "running"}
    done_at_kill = {j for j, (s, _, _) in at_kill.items() if s == "completed"}
    assert running_at_kill and done_at_kill

    finish_in_second_process(db, log)

    attempts = check_all_completed(db, accepted)
    after = snapshot(db)
    for job_id in done_at_kill:  # untouched by the second process
        assert after[job_id] == at_kill[job_id]
    for job_id in running_at_kill:  # re-run from the start
        assert attempts[job_id] == 2
    for job_id in set(accepted) - running_at_kill - done_at_kill:
        assert attempts[job_id] == 1
    lines = [line.split() for line in log.read_text().splitlines()]
    per_job = Counter(job for job, _, _ in lines)
    assert max(per_job.values()) == 1, per_job  # no job was completed twice
    pids = {job: pid for job, _, pid in lines}
    second_pid = {pids[j] for j in set(accepted) - done_at_kill}
    assert len(second_pid) == 1  # everything unfinished at the kill was completed by the restart
    assert not done_at_kill & {j for j in pids if pids[j] in second_pid}


def test_sigterm_drains_the_running_batch_and_keeps_the_queue(tmp_path: Path) -> None:
    db, log = tmp_path / "engine.db", tmp_path / "completions.log"
    first = start(db, log, "--submit", "16", "--step-delay-s", "0.02")
    try:
        accepted = read_until_submitted(first)
        wait_for(lambda: statuses(db)["running"] >= 1 and statuses(db)["queued"] >= 1, "running and queued")
        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err
    assert '"stopped"' in out
    s = statuses(db)
    assert s["running"] == 0 and s["queued"] >= 1 and s["completed"] >= 1  # drained, queue kept
    finish_in_second_process(db, log)
    attempts = check_all_completed(db, accepted)
    assert set(attempts.values()) == {1}  # nothing had to be re-run
