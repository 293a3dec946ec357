"""The job stores (SQLite; Redis when a redis-server binary is installed): transitions, queue
order, positions, exactly-once completion, recovery, purge. Both run the same tests."""

from __future__ import annotations

import random
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from engine.errors import InvalidRequest, NotReady
from engine.runtime.params import DecodingParams
from engine.runtime.result import TokenLogprob, Usage
from engine.serving.batching import Lane, batch_key_text
from engine.serving.events import RowEvent
from engine.serving.jobs import Job, JobError, JobResult, JobStatus
from engine.serving.store import sqlite as sqlite_module
from engine.serving.store.base import Completion, JobStore, Submission, open_store, per_owner
from engine.serving.store.sqlite import SqliteJobStore
from tests.stores import submission

NOW = 1_700_000_000.0
CONTRASTIVE = DecodingParams(penalty_alpha=0.6, top_k=4)


def job(n: int, params: DecodingParams | None = None, owner: str = "alice", at: float = NOW) -> Job:
    return Job(
        id=f"job{n}", owner=owner, prompts=(f"p{n}", "q"), params=params or DecodingParams(), created_at=at
    )


def result(text: str = "out") -> JobResult:
    return JobResult(
        completion=(text, "x"),
        token_ids=((5, 6), (7,)),
        usage=Usage(4, 3),
        finish_reasons=("length", "eos"),
        usages=(Usage(2, 2), Usage(2, 1)),
    )


def test_logprobs_and_params_roundtrip(store: JobStore) -> None:
    """A job that asked for logprobs keeps them, floats exact, through the store."""
    params = DecodingParams(max_new_tokens=3, logprobs=2)
    store.enqueue(submission(Job(id="lp", owner="bob", prompts=("a", "b"), params=params, created_at=NOW), 2))
    assert store.get("lp") is not None and store.get("lp").params == params  # type: ignore[union-attr]
    store.claim(["lp"], NOW + 1)
    lp = (
        (TokenLogprob(5, -0.125, ((5, -0.125), (9, -2.3025850929940455))), TokenLogprob(6, -7.5e-9, ())),
        (TokenLogprob(7, -3.0, ((2, -0.5), (7, -3.0))),),
    )
    want = JobResult(
        completion=("out", "x"),
        token_ids=((5, 6), (7,)),
        usage=Usage(4, 3),
        finish_reasons=("length", "eos"),
        usages=(Usage(2, 2), Usage(2, 1)),
        logprobs=lp,
    )
    assert store.complete("lp", 1, want, NOW + 2)
    done = store.get("lp")
    assert done is not None and done.result == want


class Backend:
    """Opens stores over the same data, and simulates a crashed server coming back."""

    def __init__(self, kind: str, tmp_path: Path, redis_url: str | None) -> None:
        self.kind = kind
        self.path = tmp_path / "sub" / "engine.db"
        self.prefix = f"test:{uuid.uuid4().hex}:"
        self.redis_url = redis_url
        self.opened: list[JobStore] = []

    def open(self) -> JobStore:
        if self.kind == "sqlite":
            s: JobStore = SqliteJobStore(self.path)
        else:
            from engine.serving.store.redis import RedisJobStore

            assert self.redis_url is not None
            s = RedisJobStore(self.redis_url, prefix=self.prefix, lease_s=REDIS_LEASE_S)
        self.opened.append(s)
        return s

    def restart_after_crash(self, old: JobStore) -> JobStore:
        """The server that ran ``old`` died; a new one starts on the same data."""
        old.close()  # SQLite: nothing more; Redis: its leases stop being renewed
        if self.kind == "redis":
            time.sleep(REDIS_LEASE_S * 1.5)
        return self.open()

    def close(self) -> None:
        for s in self.opened:
            s.close()


REDIS_LEASE_S = 0.3


@pytest.fixture(params=["sqlite", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path, redis_url: str | None) -> Iterator[Backend]:
    if request.param == "redis" and redis_url is None:
        pytest.skip("redis-server is not installed (make system-deps installs it)")
    b = Backend(request.param, tmp_path, redis_url)
    yield b
    b.close()


@pytest.fixture
def store(backend: Backend) -> JobStore:
    return backend.open()


def test_roundtrip_keeps_every_field(store: JobStore) -> None:
    params = DecodingParams(max_new_tokens=7, do_sample=True, temperature=0.5, seed=9)
    j = Job(id="a", owner="bob", prompts=("hello", "world"), params=params, created_at=NOW, model="m")
    # A seeded draw runs on our decoder (its own generator): the server queues it on that lane.
    entry = store.enqueue(Submission(j, 11, Lane.DECODER))
    assert entry.num_prompts == 2 and entry.prompt_tokens == 11 and entry.max_new_tokens == 7
    assert entry.batch_key == batch_key_text(params) and entry.lane is Lane.DECODER
    assert store.get("a") == j
    [running] = store.claim(["a"], NOW + 1)
    assert running.status is JobStatus.RUNNING and running.attempts == 1 and running.started_at == NOW + 1
    assert store.complete("a", 1, result(), NOW + 2)
    done = store.get("a")
    assert done is not None and done.status is JobStatus.COMPLETED
    assert done.result == result() and done.finished_at == NOW + 2
    assert store.get("missing") is None


def test_database_is_in_wal_mode_and_its_folder_is_created(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "engine.db"
    s = open_store(f"sqlite:///{path}")
    assert path.is_file()
    mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    s.close()


def test_positions_count_queued_jobs_ahead(store: JobStore) -> None:
    for i in range(5):
        store.enqueue(submission(job(i), 3))
    assert [store.position(f"job{i}") for i in range(5)] == [0, 1, 2, 3, 4]
    store.claim(["job0", "job1"], NOW)
    assert store.position("job0") == 0  # running
    assert [store.position(f"job{i}") for i in range(2, 5)] == [0, 1, 2]
    store.cancel("job2", NOW)
    assert store.position("job4") == 1
    assert store.position("nope") == 0
    assert store.queue_depth() == 2 and store.count(JobStatus.RUNNING) == 2


def test_positions_match_the_database_through_any_sequence_of_changes(tmp_path: Path) -> None:
    # Positions come from an in-memory index; after every change they must equal the SQL count
    # of queued jobs ahead, and a reopened store must rebuild the same index.
    path = tmp_path / "p.db"
    store = SqliteJobStore(path)
    rng = random.Random(7)
    claimed: dict[str, int] = {}
    n = 0

    def check(s: SqliteJobStore) -> None:
        rows = s._db.execute("SELECT id, seq FROM jobs WHERE status = 'queued' ORDER BY seq").fetchall()
        assert s.queue_depth() == len(rows)
        for want, (job_id, _) in enumerate(rows):
            assert s.position(job_id) == want

    for _ in range(300):
        op = rng.random()
        queued = [e.job_id for e in store.queued(Lane.BATCH, 1000)]
        if op < 0.4 or not queued:
            store.enqueue(submission(job(n), 1))
            n += 1
        elif op < 0.55:
            for j in store.claim(rng.sample(queued, min(3, len(queued))), NOW):
                claimed[j.id] = j.attempts
        elif op < 0.65:
            store.cancel(rng.choice(queued + list(claimed) or ["none"]), NOW)
        elif op < 0.75:
            store.fail(rng.choice(queued), None, JobError("timeout", "t"), NOW)
        elif op < 0.9 and claimed:
            job_id = rng.choice(list(claimed))
            store.requeue(job_id, claimed.pop(job_id))
        elif claimed:
            store.requeue_running()
            claimed.clear()
        check(store)
    store.close()
    reopened = SqliteJobStore(path)
    check(reopened)
    reopened.close()


def test_queued_lists_a_lane_and_key_oldest_first(store: JobStore) -> None:
    """A job is queued on the lane its submission names (the server's choice: with greedy_lane a
    greedy job runs on our decoder too), whatever its params."""
    store.enqueue(Submission(job(0), 1, Lane.BATCH))
    store.enqueue(Submission(job(1, CONTRASTIVE), 1, Lane.DECODER))
    store.enqueue(Submission(job(2, DecodingParams(num_beams=2)), 1, Lane.BATCH))
    store.enqueue(Submission(job(3), 1, Lane.BATCH))
    store.enqueue(Submission(job(4), 1, Lane.DECODER))
    assert [e.job_id for e in store.queued(Lane.BATCH, 10)] == ["job0", "job2", "job3"]
    assert [e.job_id for e in store.queued(Lane.DECODER, 10)] == ["job1", "job4"]
    key = batch_key_text(DecodingParams())
    assert [e.job_id for e in store.queued(Lane.BATCH, 10, key)] == ["job0", "job3"]
    assert [e.job_id for e in store.queued(Lane.BATCH, 1)] == ["job0"]


def test_queued_gives_each_owners_oldest_jobs_of_a_lane_and_key(store: JobStore) -> None:
    """Against the definition (``JobStore.queued``), computed here from what was enqueued: each
    owner with work in the lane gives its oldest ``per_owner(limit, owners)`` jobs (of the key),
    merged oldest first. Random owners, lanes and keys; some jobs leave the queue."""
    rng = random.Random(5)
    kinds = [DecodingParams(), DecodingParams(max_new_tokens=9), CONTRASTIVE, DecodingParams(num_beams=2)]
    queued: list[tuple[int, str, Lane, str]] = []  # (n, owner, lane, batch key) in enqueue order
    for n in range(400):
        params, owner = rng.choice(kinds), f"key{rng.randrange(12)}"
        entry = store.enqueue(submission(job(n, params, owner=owner), 1))
        queued.append((n, owner, entry.lane, entry.batch_key))
    gone = rng.sample(range(400), 80)
    store.claim([f"job{n}" for n in gone[:40]], NOW)
    for n in gone[40:]:
        store.cancel(f"job{n}", NOW)
    queued = [q for q in queued if q[0] not in set(gone)]
    keys = sorted({q[3] for q in queued})
    for lane in Lane:
        owners = {q[1] for q in queued if q[2] is lane}
        for limit in (1, 3, 8, 64):
            each = per_owner(limit, len(owners))
            for key in (None, *keys):
                want = []
                for owner in owners:
                    mine = [q[0] for q in queued if q[1] == owner and q[2] is lane and key in (None, q[3])]
                    want.extend(mine[:each])
                got = store.queued(lane, limit, key)
                assert [e.job_id for e in got] == [f"job{n}" for n in sorted(want)], (lane, limit, key)


def test_sqlite_reads_the_queue_in_one_statement_through_the_owner_index(tmp_path: Path) -> None:
    """However many keys have work, ``queued`` is one statement that seeks each owner's head in
    the (lane, owner[, batch_key], seq) index, not a scan of every queued job of the lane."""
    store = SqliteJobStore(tmp_path / "jobs.db")
    for n in range(60):
        store.enqueue(submission(job(n, owner=f"key{n % 6}"), 1))
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)
    try:
        assert len(store.queued(Lane.BATCH, 4)) == 6 * per_owner(4, 6)
        assert len(store.queued(Lane.BATCH, 4, batch_key_text(DecodingParams()))) == 6 * per_owner(4, 6)
    finally:
        store._db.set_trace_callback(None)
    assert len(statements) == 2, statements
    for sql, index, args in (
        (sqlite_module._QUEUED_LANE, "jobs_queued_owner ", ("[]", "batch", 1)),
        (sqlite_module._QUEUED_LANE_KEY, "jobs_queued_owner_key ", ("[]", "batch", "k", 1)),
    ):
        plan = " / ".join(row[3] for row in store._db.execute(f"EXPLAIN QUERY PLAN {sql}", args))
        assert f"USING INDEX {index}" in plan and "SCAN j" not in plan and "SCAN q" not in plan, plan
    store.close()


def test_claim_takes_only_queued_jobs(store: JobStore) -> None:
    for i in range(3):
        store.enqueue(submission(job(i), 1))
    store.cancel("job1", NOW)
    claimed = store.claim(["job2", "job1", "job0", "ghost"], NOW)
    assert [j.id for j in claimed] == ["job0", "job2"]  # queue order, cancelled and unknown skipped
    assert store.claim(["job0"], NOW) == []  # already running


def test_completion_is_exactly_once_per_attempt(backend: Backend, store: JobStore) -> None:
    store.enqueue(submission(job(0), 1))
    store.claim(["job0"], NOW)
    stale = store
    store = backend.restart_after_crash(stale)
    assert store.requeue_running() == ["job0"]  # the first worker is presumed dead
    [again] = store.claim(["job0"], NOW + 5)
    assert again.attempts == 2
    assert not store.complete("job0", 1, result("stale"), NOW + 6)  # the old worker's late result
    assert store.complete("job0", 2, result("fresh"), NOW + 7)
    assert not store.complete("job0", 2, result("twice"), NOW + 8)
    done = store.get("job0")
    assert done is not None and done.result is not None and done.result.completion[0] == "fresh"


def test_a_finished_batch_completes_together_and_each_job_still_exactly_once(store: JobStore) -> None:
    for i in range(4):
        store.enqueue(submission(job(i), 1))
    store.claim(["job0", "job1", "job2"], NOW)
    store.cancel("job1", NOW)
    batch = [Completion(f"job{i}", 1, result(f"r{i}")) for i in range(4)]
    batch.append(Completion("job2", 2, result("wrong attempt")))
    # job1 was cancelled, job3 never ran, job2's second entry names an attempt that never was.
    assert store.complete_many(batch, NOW + 3) == [True, False, True, False, False]
    for i, status in enumerate(
        [JobStatus.COMPLETED, JobStatus.CANCELLED, JobStatus.COMPLETED, JobStatus.QUEUED]
    ):
        got = store.get(f"job{i}")
        assert got is not None and got.status is status
    done = store.get("job2")
    assert done is not None and done.result == result("r2") and done.finished_at == NOW + 3
    assert store.complete_many([], NOW) == []


def test_a_failing_batch_completion_changes_nothing(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "engine.db")
    for i in range(2):
        store.enqueue(submission(job(i), 1))
    store.claim(["job0", "job1"], NOW)

    class Unencodable(JobResult):
        pass

    bad = Unencodable(completion=(object(),), token_ids=((1,),), usage=Usage(1, 1))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        store.complete_many([Completion("job0", 1, result()), Completion("job1", 1, bad)], NOW)
    assert store.count(JobStatus.RUNNING) == 2  # both still running: the supervisor requeues them
    store.close()


def test_cancel_queued_running_and_finished(store: JobStore) -> None:
    for i in range(3):
        store.enqueue(submission(job(i), 1))
    cancelled = store.cancel("job0", NOW)
    assert cancelled is not None and cancelled.status is JobStatus.CANCELLED
    store.claim(["job1"], NOW)
    running = store.cancel("job1", NOW)
    assert running is not None and running.status is JobStatus.CANCELLED
    assert not store.complete("job1", 1, result(), NOW)  # the batch's result is dropped
    store.claim(["job2"], NOW)
    store.complete("job2", 1, result(), NOW)
    finished = store.cancel("job2", NOW)
    assert finished is not None and finished.status is JobStatus.COMPLETED
    assert store.cancel("ghost", NOW) is None


def test_fail_needs_the_right_state(store: JobStore) -> None:
    store.enqueue(submission(job(0), 1))
    err = JobError("timeout", "too slow")
    assert not store.fail("job0", 1, err, NOW)  # not running
    assert store.fail("job0", None, err, NOW)  # queued
    failed = store.get("job0")
    assert failed is not None and failed.status is JobStatus.FAILED and failed.error == err
    store.enqueue(submission(job(1), 1))
    store.claim(["job1"], NOW)
    assert not store.fail("job1", None, err, NOW)  # running needs its attempt
    assert store.fail("job1", 1, err, NOW)


def test_requeue_running_keeps_queue_order_and_attempts(backend: Backend, store: JobStore) -> None:
    for i in range(4):
        store.enqueue(submission(job(i), 1))
    store.claim(["job0", "job1"], NOW)
    store = backend.restart_after_crash(store)
    assert sorted(store.requeue_running()) == ["job0", "job1"]
    assert [e.job_id for e in store.queued(Lane.BATCH, 10)] == ["job0", "job1", "job2", "job3"]
    j = store.get("job0")
    assert j is not None and j.attempts == 1 and j.started_at is None and j.status is JobStatus.QUEUED
    assert store.requeue_running() == []


def test_requeue_one_job_after_a_shutdown(store: JobStore) -> None:
    store.enqueue(submission(job(0), 1))
    store.claim(["job0"], NOW)
    assert not store.requeue("job0", 2)
    assert store.requeue("job0", 1)
    assert store.position("job0") == 0 and store.queue_depth() == 1


def test_queued_before_finds_jobs_waiting_too_long(store: JobStore) -> None:
    store.enqueue(submission(job(0, at=NOW - 100), 1))
    store.enqueue(submission(job(1, at=NOW - 10), 1))
    store.enqueue(submission(job(2, at=NOW - 200), 1))
    store.claim(["job2"], NOW)
    assert store.queued_before(NOW - 50) == ["job0"]


def test_purge_removes_only_finished_jobs_past_the_ttl(store: JobStore) -> None:
    for i in range(4):
        store.enqueue(submission(job(i, at=NOW - 1000), 1))
    store.claim(["job0", "job1"], NOW - 900)
    store.complete("job0", 1, result(), NOW - 800)  # old result
    store.complete("job1", 1, result(), NOW - 10)  # fresh result
    store.cancel("job2", NOW - 800)  # old cancellation
    # job3 is still queued, however old.
    assert store.purge_expired(NOW, ttl_s=100) == 2
    assert store.get("job0") is None and store.get("job2") is None
    assert store.get("job1") is not None and store.get("job3") is not None


def test_store_urls(tmp_path: Path) -> None:
    s = open_store("sqlite:///:memory:")
    assert s.ping()
    s.close()
    assert not s.ping()
    with pytest.raises(InvalidRequest, match="no host"):
        open_store("sqlite://host/x.db")
    with pytest.raises(InvalidRequest, match="unknown option"):
        open_store(f"sqlite:///{tmp_path}/x.db?journal=off")
    with pytest.raises(InvalidRequest, match="synchronous must be normal or full"):
        open_store(f"sqlite:///{tmp_path}/x.db?synchronous=off")
    with pytest.raises(InvalidRequest, match="unknown option"):
        open_store("redis://127.0.0.1:1/0?ttl=3")
    with pytest.raises(InvalidRequest, match="lease_s must be a positive number"):
        open_store("redis://127.0.0.1:1/0?lease_s=-1")
    with pytest.raises(NotReady, match=r"cannot reach the Redis job store at redis://127\.0\.0\.1:1/0"):
        open_store("redis://127.0.0.1:1/0?lease_s=5")
    with pytest.raises(InvalidRequest, match="not supported"):
        open_store("postgres://x/y")
    full = open_store(f"sqlite:///{tmp_path}/full.db?synchronous=full")
    full.close()


def test_a_closed_or_broken_store_is_not_ready(tmp_path: Path) -> None:
    s = SqliteJobStore(tmp_path / "x.db")
    s.close()
    with pytest.raises(NotReady, match=r"^the job store is unavailable; retry in a moment$"):
        s.get("a")
    with pytest.raises(NotReady):
        s.enqueue(submission(job(0), 1))


def test_redis_servers_share_one_queue_and_take_over_a_dead_servers_jobs(redis_url: str | None) -> None:
    if redis_url is None:
        pytest.skip("redis-server is not installed (make system-deps installs it)")
    from engine.serving.store.redis import RedisJobStore

    prefix = f"test:{uuid.uuid4().hex}:"
    lease_s = 1.0  # renewed every 0.33 s: a loaded machine must not delay a renewal past the lease
    a = RedisJobStore(redis_url, prefix=prefix, lease_s=lease_s)
    b = RedisJobStore(redis_url, prefix=prefix, lease_s=lease_s)
    try:
        for i in range(3):
            a.enqueue(submission(job(i), 1))
        assert b.queue_depth() == 3 and b.position("job2") == 2
        assert [j.id for j in a.claim(["job0"], NOW)] == ["job0"]
        assert [j.id for j in b.claim(["job0", "job1"], NOW)] == ["job1"]  # never twice
        time.sleep(lease_s * 1.5)
        assert b.requeue_running() == []  # both alive: their leases are renewed
        assert a.get("job0").status is JobStatus.RUNNING  # type: ignore[union-attr]
        a.close()  # server a dies with job0
        deadline = time.monotonic() + 10
        while b.get("job0").status is not JobStatus.QUEUED:  # type: ignore[union-attr]
            b.requeue_running()
            assert time.monotonic() < deadline, "job0 was never requeued"
            time.sleep(0.05)
        [again] = b.claim(["job0"], NOW)
        assert again.attempts == 2
        assert b.complete("job0", 2, result("b"), NOW)
        assert not b.complete("job0", 1, result("a, late"), NOW)
        assert b.complete("job1", 1, result(), NOW)
        assert b.count(JobStatus.COMPLETED) == 2 and b.count(JobStatus.RUNNING) == 0
    finally:
        a.close()
        b.close()


def test_the_job_service_runs_on_redis(redis_url: str | None) -> None:
    if redis_url is None:
        pytest.skip("redis-server is not installed (make system-deps installs it)")
    import asyncio

    from engine.serving.store.redis import RedisJobStore
    from harness.fakes import expected_tokens, fake_tokenize, start_service

    async def body() -> None:
        store = RedisJobStore(redis_url, prefix=f"test:{uuid.uuid4().hex}:")
        # The batcher waits a second for a fuller batch, so that on a loaded machine it does not
        # claim the first jobs before the fifth is submitted (queue positions are read at submit).
        svc = await start_service(store=store, max_queue_delay_ms=1000.0)
        views = [await svc.submit("a", [f"p {i}"], DecodingParams(max_new_tokens=6)) for i in range(5)]
        assert [v.queue_position for v in views] == [0, 1, 2, 3, 4]
        contrastive = await svc.submit(
            "a", ["c"], DecodingParams(max_new_tokens=4, penalty_alpha=0.5, top_k=3)
        )
        for v in [*views, contrastive]:
            done = await svc.wait("a", v.job.id, 10)
            assert done.job.status is JobStatus.COMPLETED and done.job.result is not None
            n = v.job.params.max_new_tokens
            assert list(done.job.result.token_ids[0]) == expected_tokens(fake_tokenize(v.job.prompts[0]), n)
        await svc.stop()

    asyncio.run(asyncio.wait_for(body(), 30))


def test_a_job_cancelled_through_another_server_stops_where_it_runs(redis_url: str | None) -> None:
    if redis_url is None:
        pytest.skip("redis-server is not installed (make system-deps installs it)")
    import asyncio

    from engine.runtime.result import FinishReason
    from engine.serving.store.redis import RedisJobStore
    from harness.fakes import FakeEngine, start_service, until

    async def body() -> None:
        prefix = f"test:{uuid.uuid4().hex}:"
        engine_a = FakeEngine(step_delay_s=0.01)
        a = await start_service(engine_a, store=RedisJobStore(redis_url, prefix=prefix))
        b = await start_service(FakeEngine(), store=RedisJobStore(redis_url, prefix=prefix))
        view = await a.submit("alice", ["long"], DecodingParams(max_new_tokens=500))
        await until(engine_a.started.is_set)
        cancelled = await b.cancel("alice", view.job.id)  # through server b
        assert cancelled.job.status is JobStatus.CANCELLED
        await until(lambda: bool(engine_a.calls), timeout_s=10)  # a's call ends early
        assert engine_a.calls[0].finish_reasons == (FinishReason.CANCELLED,)
        assert engine_a.calls[0].steps < 500
        await a.stop()
        await b.stop()

    asyncio.run(asyncio.wait_for(body(), 30))


def test_statuses_and_cancelled_read_many_jobs_at_once(store: JobStore) -> None:
    for n in range(4):
        store.enqueue(submission(job(n), 1))
    store.claim(["job1", "job2"], NOW)
    store.cancel("job2", NOW)
    store.cancel("job3", NOW)
    ids = ["job0", "job1", "job2", "job3", "nope"]
    assert store.statuses(ids) == {
        "job0": JobStatus.QUEUED,
        "job1": JobStatus.RUNNING,
        "job2": JobStatus.CANCELLED,
        "job3": JobStatus.CANCELLED,
    }
    assert store.cancelled(ids) == {"job2", "job3"} and store.cancelled([]) == set()
    assert store.shared is isinstance(store, _redis_store_type())


def _redis_store_type() -> type:
    from engine.serving.store.redis import RedisJobStore

    return RedisJobStore


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_the_cancellation_sweep_reads_the_store_once_and_only_when_it_is_shared(
    kind: str, redis_url: str | None
) -> None:
    """Scheduler.sync_cancellations (every second): one batched read of every job running here on
    a shared store, none per job; on SQLite (one process a file) no read at all."""
    if kind == "redis" and redis_url is None:
        pytest.skip("redis-server is not installed (make system-deps installs it)")
    import asyncio
    import threading

    from harness.fakes import FakeEngine, start_service, until

    calls: list[str] = []
    prefix = f"test:{uuid.uuid4().hex}:"

    def counting(base: Any) -> Any:
        class Counting(base):
            def get(self, job_id: str) -> Job | None:
                calls.append("get")
                return super().get(job_id)

            def statuses(self, job_ids: Sequence[str]) -> dict[str, JobStatus]:
                calls.append(f"statuses {len(job_ids)}")
                return super().statuses(job_ids)

        return Counting

    def open_counting() -> JobStore:
        if kind == "sqlite":
            return counting(SqliteJobStore)(":memory:")
        return counting(_redis_store_type())(redis_url, prefix=prefix)

    async def body() -> None:
        gate = threading.Event()
        store = open_counting()
        a = await start_service(FakeEngine(gate=gate), store=store, max_queue_delay_ms=50.0)
        views = await asyncio.gather(*(a.submit("alice", [f"p{i}"], DecodingParams()) for i in range(3)))
        scheduler = a._scheduler
        assert scheduler is not None
        await until(lambda: len(scheduler.running) == 3)
        if kind == "redis":  # through another server's store, with no await before the sweep
            other = _redis_store_type()(redis_url, prefix=prefix)
            other.cancel(views[1].job.id, time.time())
            other.close()
        calls.clear()
        scheduler.sync_cancellations()
        if kind == "sqlite":
            assert calls == []
        else:
            assert calls == ["statuses 3"]
            assert [scheduler.running[v.job.id].cancelled for v in views] == [False, True, False]
            calls.clear()
            scheduler.sync_cancellations()  # the cancelled job is no longer asked about
            assert calls == ["statuses 2"]
        gate.set()
        await a.stop()

    asyncio.run(asyncio.wait_for(body(), 30))


def test_wait_and_stream_on_one_server_for_a_job_another_server_runs(redis_url: str | None) -> None:
    if redis_url is None:
        pytest.skip("redis-server is not installed (make system-deps installs it)")
    import asyncio

    from engine.serving.store.redis import RedisJobStore
    from harness.fakes import FakeEngine, expected_tokens, fake_tokenize, start_service

    async def body() -> None:
        prefix = f"test:{uuid.uuid4().hex}:"
        runner = await start_service(
            FakeEngine(step_delay_s=0.01), store=RedisJobStore(redis_url, prefix=prefix)
        )
        # The other server has a gated engine: it never runs anything itself.
        import threading

        idle = await start_service(
            FakeEngine(gate=threading.Event()), store=RedisJobStore(redis_url, prefix=prefix)
        )
        idle._scheduler.stop_claiming()  # type: ignore[union-attr]
        view = await runner.submit("alice", ["shared"], DecodingParams(max_new_tokens=50))
        waited, streamed = await asyncio.gather(
            idle.wait("alice", view.job.id, timeout_s=20),
            _collect(idle.stream("alice", view.job.id)),
        )
        want = expected_tokens(fake_tokenize("shared"), 50)
        assert waited.job.status is JobStatus.COMPLETED
        assert waited.job.result is not None and list(waited.job.result.token_ids[0]) == want
        assert [ev.result.token_ids for ev in streamed if ev.result] == [tuple(want)]
        await runner.stop()
        await idle.stop(drain_timeout_s=0)

    asyncio.run(asyncio.wait_for(body(), 30))


async def _collect(events: AsyncIterator[RowEvent]) -> list[RowEvent]:
    return [ev async for ev in events]


def test_the_stored_params_are_the_params_own_dict() -> None:
    from engine.serving.store.sqlite import _params_dict

    params = DecodingParams(
        max_new_tokens=9,
        min_new_tokens=2,
        top_k=7,
        penalty_alpha=0.25,
        num_beams=3,
        length_penalty=0.5,
        do_sample=True,
        temperature=0.7,
        top_p=0.9,
        seed=11,
        repetition_penalty=1.2,
        no_repeat_ngram_size=3,
    )
    assert _params_dict(params) == params.to_dict()
    assert _params_dict(DecodingParams()) == DecodingParams().to_dict()
