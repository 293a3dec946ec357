"""Group commit of submits: the submits that arrive together share one SQLite commit, and every
submit is answered only once its job is durable. Queue order and positions stay exact, a commit
that fails loses only unanswered jobs (each of them answered 503), and anything else that writes
commits the open group first."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from engine.errors import NotReady
from engine.runtime.params import DecodingParams
from engine.serving.jobs import Job, JobStatus
from engine.serving.store.sqlite import SqliteJobStore
from harness.fakes import FakeEngine, start_service, until
from tests.stores import submission


def job(i: int) -> Job:
    return Job(
        id=f"g-{i:03d}", owner="alice", prompts=(f"p{i}",), params=DecodingParams(), created_at=10.0 + i
    )


def on_disk(path: Path) -> list[str]:
    """Job ids, in queue order, as another process would find them in the file now."""
    con = sqlite3.connect(path)
    try:
        return [r[0] for r in con.execute("SELECT id FROM jobs ORDER BY seq")]
    finally:
        con.close()


class FailingCommits:
    """The store's connection, except that COMMIT fails (a full disk, say) while ``failing``."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self.failing = True

    def execute(self, sql: str, *args: Any) -> Any:
        if self.failing and sql == "COMMIT":
            raise sqlite3.OperationalError("database or disk is full")
        return self._db.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)


def test_deferred_enqueues_are_queued_at_once_and_durable_after_the_commit(tmp_path: Path) -> None:
    db = tmp_path / "engine.db"
    store = SqliteJobStore(db)
    store.enqueue(submission(job(0), 1))
    for i in range(1, 6):
        store.enqueue_deferred(submission(job(i), 1))
    assert store.queue_depth() == 6 and [store.position(job(i).id) for i in range(6)] == list(range(6))
    assert on_disk(db) == [job(0).id]  # not durable yet: no submit has been answered
    store.commit_deferred()
    assert on_disk(db) == [job(i).id for i in range(6)]
    assert not any(store.lost(job(i).id) for i in range(6))
    store.close()


def test_every_other_write_commits_the_open_group_first(tmp_path: Path) -> None:
    db = tmp_path / "engine.db"
    store = SqliteJobStore(db)
    for i in range(3):
        store.enqueue_deferred(submission(job(i), 1))
    claimed = store.claim([job(1).id], 5.0)  # the batch loop, before the submits' commit ran
    assert [j.id for j in claimed] == [job(1).id] and claimed[0].status is JobStatus.RUNNING
    assert on_disk(db) == [job(i).id for i in range(3)]
    store.enqueue_deferred(submission(job(3), 1))
    store.cancel(job(0).id, 6.0)
    assert on_disk(db) == [job(i).id for i in range(4)]
    store.enqueue_deferred(submission(job(4), 1))
    store.close()  # a clean stop keeps what was enqueued
    assert on_disk(db) == [job(i).id for i in range(5)]


def test_a_failed_commit_loses_the_whole_group_and_nothing_else(tmp_path: Path) -> None:
    db = tmp_path / "engine.db"
    store = SqliteJobStore(db)
    store.enqueue(submission(job(0), 1))
    failing = FailingCommits(store._db)
    store._db = failing  # type: ignore[assignment]
    for i in range(1, 4):
        store.enqueue_deferred(submission(job(i), 1))
    with pytest.raises(NotReady, match="the job store is unavailable"):
        store.commit_deferred()
    assert [store.lost(job(i).id) for i in range(1, 4)] == [True, True, True]
    assert not store.lost(job(1).id)  # reported once
    assert store.queue_depth() == 1
    failing.failing = False
    deadline = time.monotonic() + 5  # marked down: calls fail fast until the probe sees it answer
    while not store.ping():
        assert time.monotonic() < deadline, "the store's probe never marked it up again"
        time.sleep(0.02)
    assert store.get(job(2).id) is None
    store.enqueue_deferred(submission(job(4), 1))  # the store goes on once the disk has room again
    store.commit_deferred()
    assert on_disk(db) == [job(0).id, job(4).id] and store.position(job(4).id) == 1
    store.close()


def test_submits_that_arrive_together_share_one_commit_and_are_on_disk_when_answered(tmp_path: Path) -> None:
    async def body() -> None:
        db = tmp_path / "engine.db"
        gate = threading.Event()  # the engine holds the first batch: the rest stays queued
        store = SqliteJobStore(db)
        svc = await start_service(FakeEngine(gate=gate), store=store)
        commits = 0
        real_commit = store.commit_deferred

        def counting_commit() -> None:
            nonlocal commits
            commits += 1
            real_commit()

        store.commit_deferred = counting_commit  # type: ignore[method-assign]
        first = await svc.submit("a", ["first"], DecodingParams(max_new_tokens=4))
        await until(lambda: svc.store.queue_depth() == 0)  # running (held by the gate)
        commits = 0
        views = await asyncio.gather(
            *(svc.submit("a", [f"prompt {i}"], DecodingParams(max_new_tokens=4)) for i in range(20))
        )
        assert commits == 1
        ids = [v.job.id for v in views]
        assert on_disk(db) == [first.job.id, *ids]  # every answered job is in the file
        assert [v.queue_position for v in views] == list(range(20))
        gate.set()
        await svc.stop()

    asyncio.run(body())


def test_a_failed_group_commit_answers_every_submit_of_the_group_with_not_ready(tmp_path: Path) -> None:
    async def body() -> None:
        db = tmp_path / "engine.db"
        gate = threading.Event()
        store = SqliteJobStore(db)
        svc = await start_service(FakeEngine(gate=gate), store=store)
        await svc.submit("a", ["running"], DecodingParams(max_new_tokens=4))
        await until(lambda: store.queue_depth() == 0)
        failing = FailingCommits(store._db)
        store._db = failing  # type: ignore[assignment]
        outcomes = await asyncio.gather(
            *(svc.submit("a", [f"p{i}"], DecodingParams(max_new_tokens=4)) for i in range(5)),
            return_exceptions=True,
        )
        assert all(isinstance(o, NotReady) for o in outcomes), outcomes
        assert store.queue_depth() == 0 and len(on_disk(db)) == 1
        failing.failing = False
        await until(store.ping)  # the probe sees the store answer again
        ok = await svc.submit("a", ["after"], DecodingParams(max_new_tokens=4))
        assert ok.queue_position == 0 and len(on_disk(db)) == 2
        gate.set()
        await svc.stop()

    asyncio.run(body())
