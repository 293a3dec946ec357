"""No stranded job: each store call on a job's way fails once, and the job still ends (completed),
found again from the store, within job_timeout_s. Also: one server per SQLite file, and a store
that is down answers at once (fail fast) instead of holding the event loop."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from engine.errors import InvalidRequest, NotReady
from engine.runtime.params import DecodingParams
from engine.serving.jobs import JobStatus
from engine.serving.store.base import JobStore
from engine.serving.store.sqlite import SqliteJobStore
from harness.fakes import FakeEngine, expected_tokens, fake_tokenize, start_service
from tests.stores import submission

JOB_TIMEOUT_S = 8.0


def fail_once(obj: Any, name: str, fired: list[str] | None = None) -> list[str]:
    """Make ``obj.name`` raise NotReady (what a failing store raises) on its first call; the
    returned list (``fired``, when given) records that it fired."""
    real = getattr(obj, name)
    fired = [] if fired is None else fired

    def once(*args: Any, **kwargs: Any) -> Any:
        if name not in fired:
            fired.append(name)
            raise NotReady("injected store failure")
        return real(*args, **kwargs)

    setattr(obj, name, once)
    return fired


def open_store(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> JobStore:
    if kind == "sqlite":
        return SqliteJobStore(tmp_path / "engine.db")
    url = request.getfixturevalue("redis_url")
    if url is None:
        pytest.skip("redis-server is not installed (make system-deps installs it)")
    from engine.serving.store.redis import RedisJobStore

    return RedisJobStore(f"{url}?prefix=t{uuid.uuid4().hex}:&lease_s=0.6")


def run_with_fault(store: JobStore, inject: Callable[[JobStore], list[str]], contrastive: bool) -> None:
    async def body() -> None:
        params = (
            DecodingParams(max_new_tokens=6, penalty_alpha=0.5, top_k=3)
            if contrastive
            else DecodingParams(max_new_tokens=6)
        )
        svc = await start_service(FakeEngine(), store=store, job_timeout_s=JOB_TIMEOUT_S)
        fired = inject(store)
        start = time.monotonic()
        view = await svc.submit("alice", ["stranded?"], params)
        done = view
        while not done.job.status.terminal and time.monotonic() - start < JOB_TIMEOUT_S:
            # A wait returns early when the job goes back to the queue: wait again.
            done = await svc.wait("alice", view.job.id, timeout_s=JOB_TIMEOUT_S)
        assert fired, "the fault was never injected"
        assert done.job.status is JobStatus.COMPLETED, (done.job.status, done.job.error)
        assert done.job.result is not None
        assert list(done.job.result.token_ids[0]) == expected_tokens(fake_tokenize("stranded?"), 6)
        assert time.monotonic() - start < JOB_TIMEOUT_S
        assert store.count(JobStatus.RUNNING) == 0 and store.queue_depth() == 0
        await svc.stop()

    asyncio.run(asyncio.wait_for(body(), 30))


FAULTS: dict[str, Callable[[JobStore], list[str]]] = {
    "claim": lambda s: fail_once(s, "claim"),
    "complete_many": lambda s: fail_once(s, "complete_many"),
    # The completion and then the requeue that would put the job back both fail: only the store
    # still knows the job, RUNNING, and the reconcile sweep (SQLite) or the lease (Redis) finds it.
    "complete_many+requeue": lambda s: fail_once(s, "requeue", fail_once(s, "complete_many")),
    "queued": lambda s: fail_once(s, "queued"),
}


@pytest.mark.parametrize("contrastive", [False, True], ids=["batch", "contrastive"])
@pytest.mark.parametrize("fault", sorted(FAULTS))
@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_a_store_failure_on_a_jobs_way_never_strands_it(
    kind: str, fault: str, contrastive: bool, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    store = open_store(kind, tmp_path, request)
    run_with_fault(store, FAULTS[fault], contrastive)


def test_a_redis_claim_whose_second_round_trip_fails_is_run_after_its_lease(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    store = open_store("redis", tmp_path, request)
    client = store._r  # type: ignore[attr-defined]

    real = client.pipeline
    fired: list[str] = []

    def pipeline(*args: Any, transaction: bool = True, **kwargs: Any) -> Any:
        if not transaction and not fired:  # the claim script ran; reading its jobs back fails
            fired.append("claim read-back")
            raise NotReady("injected store failure")
        return real(*args, transaction=transaction, **kwargs)

    def inject(s: JobStore) -> list[str]:
        client.pipeline = pipeline
        return fired

    run_with_fault(store, inject, contrastive=False)


def test_a_second_server_on_one_sqlite_file_fails_at_once_and_changes_nothing(tmp_path: Path) -> None:
    db = tmp_path / "engine.db"
    first = SqliteJobStore(db)
    before = db.read_bytes()
    with pytest.raises(InvalidRequest) as info:
        SqliteJobStore(db)
    message = info.value.message
    assert str(db) in message and "in use by another server" in message
    import os

    assert f"pid {os.getpid()}" in message and "redis://" in message
    assert db.read_bytes() == before
    first.close()
    SqliteJobStore(db).close()  # free again once the first one closed


def test_a_store_marked_down_fails_fast_and_comes_back(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "engine.db")
    store.health.failed(OSError("disk gone"))  # as a failed call does
    assert not store.ping()
    t0 = time.monotonic()
    with pytest.raises(NotReady) as info:
        store.get("x")
    assert time.monotonic() - t0 < 0.05 and info.value.retry_after_s == 1.0
    deadline = time.monotonic() + 5
    while not store.ping():  # the probe, off the event loop, sees it answer
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert store.get("x") is None
    store.close()


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_results_are_purged_in_bounded_batches(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A day of results is not deleted in one call that could outlast the store's timeout."""
    from engine.serving.jobs import Job
    from engine.serving.store.base import Completion
    from tests.test_store import result

    store = open_store(kind, tmp_path, request)
    jobs = [
        Job(id=f"p{i}", owner="a", prompts=("x",), params=DecodingParams(), created_at=10.0) for i in range(7)
    ]
    for j in jobs:
        store.enqueue(submission(j, 1))
    store.claim([j.id for j in jobs], 20.0)
    store.complete_many([Completion(j.id, 1, result()) for j in jobs], 30.0)
    assert [store.purge_expired(100.0, 10.0, limit=3) for _ in range(4)] == [3, 3, 1, 0]
    assert all(store.get(j.id) is None for j in jobs)
    store.close()


def test_every_replica_on_one_redis_reports_the_shared_queue_depth(
    redis_stores: Callable[[], JobStore],
) -> None:
    """engine_queue_depth is the shared queue's depth on each replica (a dashboard takes max over
    replicas; a sum would count the queue once per replica)."""
    import threading

    from engine.metrics import Metrics

    async def body() -> None:
        gates = [threading.Event(), threading.Event()]
        metrics = [Metrics(), Metrics()]
        a, b = [
            await start_service(FakeEngine(gate=g), store=redis_stores(), metrics=m)
            for g, m in zip(gates, metrics, strict=True)
        ]
        b._scheduler.stop_claiming()  # type: ignore[union-attr]  # b only watches the queue
        for i in range(8):  # all through replica a; b has seen no submit
            await a.submit("alice", [f"q{i}"], DecodingParams(max_new_tokens=4))

        def depths() -> list[float]:
            return [m.registry.get_sample_value("engine_queue_depth") or 0.0 for m in metrics]

        shared = a.store.queue_depth()
        assert 0 < shared < 8  # a's gated engine holds what it took
        deadline = time.monotonic() + 5
        while depths() != [shared, shared]:  # b learns it from the store within a sweep
            assert time.monotonic() < deadline, (depths(), shared)
            await asyncio.sleep(0.05)
        for g in gates:
            g.set()
        await a.stop()
        await b.stop()

    asyncio.run(asyncio.wait_for(body(), 30))


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_the_continuous_loop_restarts_clean_after_a_store_failure_with_jobs_in_flight(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A completion fails while another job is still in our decoder's batch: the supervisor hands
    both back to the queue, and the restarted loop must not keep stepping (or re-add) the rows it
    held; both jobs complete once, with their own ids."""
    store = open_store(kind, tmp_path, request)

    async def body() -> None:
        svc = await start_service(FakeEngine(step_delay_s=0.005), store=store, job_timeout_s=JOB_TIMEOUT_S)
        fired = fail_once(store, "complete_many")
        long = await svc.submit(
            "alice", ["long one"], DecodingParams(max_new_tokens=60, penalty_alpha=0.5, top_k=3)
        )
        short = await svc.submit(
            "bob", ["short"], DecodingParams(max_new_tokens=3, penalty_alpha=0.5, top_k=3)
        )
        start = time.monotonic()
        for view, n in ((short, 3), (long, 60)):
            done = view
            while not done.job.status.terminal and time.monotonic() - start < JOB_TIMEOUT_S:
                done = await svc.wait(view.job.owner, view.job.id, timeout_s=JOB_TIMEOUT_S)
            assert done.job.status is JobStatus.COMPLETED, (done.job.status, done.job.error)
            assert done.job.result is not None
            assert list(done.job.result.token_ids[0]) == expected_tokens(
                fake_tokenize(view.job.prompts[0]), n
            )
        assert fired
        loop = svc._scheduler.continuous_loop  # type: ignore[union-attr]
        await asyncio.sleep(0.2)
        assert not loop.active and store.count(JobStatus.RUNNING) == 0
        await svc.stop()

    asyncio.run(asyncio.wait_for(body(), 30))
