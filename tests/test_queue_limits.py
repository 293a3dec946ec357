"""The queue's limits, checked once in JobService.submit: queued jobs and prompt tokens per API key,
the server's queued-token budget (memory for queued work), and token ids freed wherever a job
ends. Through the service with a FakeEngine, on SQLite and on a real Redis; one REST test shows
the 429 and its Retry-After as a client sees them."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from engine.api.auth import Authenticator, create_key
from engine.api.client import InProcessClient
from engine.api.grpc_service import EngineServicer
from engine.api.rest import create_app
from engine.errors import InvalidRequest, Overloaded
from engine.metrics import Metrics
from engine.runtime.params import DecodingParams
from engine.serving.jobs import Job, JobStatus
from engine.serving.service import JobService
from engine.serving.store.base import JobStore, LimitReached, QueueLimits, QueueLoad
from engine.serving.store.keys import SqliteKeyStore
from harness.api_fakes import INFO, fake_decode
from harness.fakes import FakeEngine, fake_tokenize, start_service, until
from tests.stores import submission
from tests.test_store import result

P = DecodingParams(max_new_tokens=4)
BEAM = DecodingParams(max_new_tokens=4, num_beams=2)  # another batch key: stays queued behind P


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), timeout=60))


def tokens(*prompts: str) -> int:
    return sum(len(fake_tokenize(p)) for p in prompts)


async def held(engine: FakeEngine, svc: JobService) -> None:
    """Submit a job that keeps the (gated) engine busy, so later jobs stay queued."""
    await svc.submit("holder", ["running"], P)
    await until(engine.started.is_set)


def test_the_store_counts_queued_jobs_and_tokens_per_key(job_store: JobStore) -> None:
    def job(n: int, owner: str, prompts: tuple[str, ...]) -> Job:
        return Job(id=f"j{n}", owner=owner, prompts=prompts, params=P, created_at=1.0)

    job_store.enqueue(submission(job(1, "a", ("x", "y")), 7))
    job_store.enqueue(submission(job(2, "a", ("x",)), 5))
    job_store.enqueue(submission(job(3, "b", ("x",)), 3))
    assert job_store.load("a") == QueueLoad(jobs=3, tokens=15, owner_jobs=2, owner_tokens=12)
    assert job_store.load("nobody") == QueueLoad(3, 15, 0, 0)
    [claimed] = job_store.claim(["j1"], 2.0)
    assert job_store.load("a") == QueueLoad(2, 8, 1, 5)
    assert job_store.still_queued(["j1", "j2", "j3", "unknown"]) == {"j2", "j3"}
    job_store.requeue("j1", claimed.attempts)
    assert job_store.load("a") == QueueLoad(3, 15, 2, 12)
    job_store.cancel("j2", 3.0)
    assert job_store.load("a") == QueueLoad(2, 10, 1, 7)
    [claimed] = job_store.claim(["j3"], 3.0)
    job_store.complete("j3", claimed.attempts, result(), 4.0)
    assert job_store.load("b") == QueueLoad(1, 7, 0, 0)


def test_a_key_past_its_queued_jobs_limit_gets_429_and_others_still_get_in(job_store: JobStore) -> None:
    async def body() -> None:
        gate = threading.Event()
        engine = FakeEngine(gate=gate)
        svc = await start_service(engine, store=job_store, max_queued_jobs_per_key=3)
        await held(engine, svc)
        accepted = [await svc.submit("a", [f"q{i}"], BEAM) for i in range(3)]
        with pytest.raises(
            Overloaded, match=r"3 jobs queued, the limit max_queued_jobs_per_key is 3"
        ) as info:
            await svc.submit("a", ["q3"], BEAM)
        assert 1.0 <= info.value.retry_after_s <= 60.0
        accepted.append(await svc.submit("b", ["other key"], BEAM))  # another key is not held back
        gate.set()
        for v in accepted:  # nothing accepted is lost
            assert (await svc.wait(v.job.owner, v.job.id, 10)).job.status is JobStatus.COMPLETED
        await svc.submit("a", ["q3"], BEAM)  # room again
        await svc.stop()

    run(body)


def test_a_key_past_its_queued_tokens_limit_gets_429(job_store: JobStore) -> None:
    async def body() -> None:
        gate = threading.Event()
        engine = FakeEngine(gate=gate)
        limit = tokens("one two three") * 2
        svc = await start_service(engine, store=job_store, max_queued_tokens_per_key=limit)
        await held(engine, svc)
        first = await svc.submit("a", ["one two three", "one two three"], BEAM)  # exactly the limit
        with pytest.raises(Overloaded, match=rf"this API key has {limit} prompt tokens queued"):
            await svc.submit("a", ["x"], BEAM)
        with pytest.raises(InvalidRequest, match=r"at most \d+ queued .*split it"):
            await svc.submit("b", ["one two three"] * 3, BEAM)  # alone over the limit: never fits
        other = await svc.submit("b", ["one two three"], BEAM)
        gate.set()
        for v in (first, other):
            assert (await svc.wait(v.job.owner, v.job.id, 10)).job.status is JobStatus.COMPLETED
        await svc.stop()

    run(body)


def test_the_servers_queued_token_budget_bounds_all_keys_together(job_store: JobStore) -> None:
    async def body() -> None:
        gate = threading.Event()
        engine = FakeEngine(gate=gate)
        budget = tokens("w") * 4
        svc = await start_service(
            engine, store=job_store, max_queued_tokens=budget, max_queued_tokens_per_key=budget
        )
        await held(engine, svc)
        accepted = [await svc.submit(owner, ["w"], BEAM) for owner in ("a", "b", "c", "d")]
        with pytest.raises(Overloaded, match=rf"{budget} prompt tokens waiting.*max_queued_tokens {budget}"):
            await svc.submit("e", ["w"], BEAM)
        gate.set()
        for v in accepted:
            assert (await svc.wait(v.job.owner, v.job.id, 10)).job.status is JobStatus.COMPLETED
        assert job_store.load("e") == QueueLoad(0, 0, 0, 0)
        await svc.stop()

    run(body)


def test_rest_answers_429_with_retry_after_naming_the_limit(tmp_path: Path) -> None:
    async def body() -> None:
        gate = threading.Event()
        engine = FakeEngine(gate=gate)
        svc = await start_service(engine, max_queued_jobs_per_key=1)
        keys = SqliteKeyStore(str(tmp_path / "keys.db"))
        alice = create_key(keys, "alice")
        servicer = EngineServicer(svc, Authenticator(keys), INFO, metrics=Metrics(), decode=fake_decode)
        app = create_app(InProcessClient(servicer), Metrics())
        await held(engine, svc)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            headers = {"apiKey": alice}
            body = {"prompt": "q", "params": {"num_beams": 2, "max_new_tokens": 4}}
            ok = await http.post("/v1/submit", json=body, headers=headers)
            assert ok.status_code == 200, ok.text
            r = await http.post("/v1/submit", json=body, headers=headers)
            assert r.status_code == 429, r.text
            assert "max_queued_jobs_per_key" in r.json()["error"]["message"]
            assert int(r.headers["Retry-After"]) >= 1
        gate.set()
        await svc.stop()
        keys.close()

    run(body)


def test_token_ids_are_freed_wherever_a_job_ends() -> None:
    async def body() -> None:
        gate = threading.Event()
        engine = FakeEngine(gate=gate)
        svc = await start_service(engine, job_timeout_s=0.5)
        sched = svc._scheduler
        assert sched is not None
        await held(engine, svc)
        cancelled = await svc.submit("a", ["cancel me"], BEAM)
        expired = await svc.submit("a", ["expire me"], BEAM)
        assert {cancelled.job.id, expired.job.id} <= set(sched.input_ids)
        await svc.cancel("a", cancelled.job.id)
        assert cancelled.job.id not in sched.input_ids
        await until(lambda: expired.job.id not in sched.input_ids)  # failed by the timeout sweep
        assert (await svc.get("a", expired.job.id)).job.status is JobStatus.FAILED
        gate.set()
        done = await svc.submit("a", ["run me"], P)
        await svc.wait("a", done.job.id, 10)
        assert sched.input_ids == {}
        await svc.stop()

    run(body)


def test_token_ids_of_a_job_another_server_ran_are_freed(redis_stores: Callable[[], JobStore]) -> None:
    async def body() -> None:
        here = await start_service(FakeEngine(), store=redis_stores(), job_timeout_s=2.0)
        there = await start_service(FakeEngine(), store=redis_stores())
        sched = here._scheduler
        assert sched is not None
        sched.stop_claiming()  # this server takes no job: the other one runs what it accepts
        view = await here.submit("a", ["ran elsewhere"], P)
        assert view.job.id in sched.input_ids
        assert (await there.wait("a", view.job.id, 10)).job.status is JobStatus.COMPLETED
        await until(lambda: view.job.id not in sched.input_ids, timeout_s=5)
        await there.stop()
        await here.stop()

    run(body)


def test_servers_sharing_redis_cannot_pass_a_limit_together(redis_stores: Callable[[], JobStore]) -> None:
    """The check is in the enqueue script, atomic with the write: two servers racing for the last
    places of a key's share get exactly those places between them."""
    stores = [redis_stores(), redis_stores()]
    limits = QueueLimits(
        max_queue_size=100,
        max_queued_tokens=10**6,
        max_queued_jobs_per_key=5,
        max_queued_tokens_per_key=10**6,
    )
    accepted: list[str] = []
    refused: list[LimitReached] = []

    def submit(n: int) -> None:
        job = Job(id=f"j{n}", owner="a", prompts=("p",), params=P, created_at=1.0)
        try:
            stores[n % 2].enqueue(submission(job, 2, limits=limits))
            accepted.append(job.id)
        except LimitReached as full:
            refused.append(full)

    threads = [threading.Thread(target=submit, args=(n,)) for n in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(accepted) == 5 and len(refused) == 15
    assert {r.limit for r in refused} == {"max_queued_jobs_per_key"}
    assert stores[0].load("a") == QueueLoad(5, 10, 5, 10)
    for s in stores:
        s.close()


def test_the_store_refuses_past_each_limit_in_order(job_store: JobStore) -> None:
    def job(n: int, owner: str) -> Job:
        return Job(id=f"j{n}", owner=owner, prompts=("p",), params=P, created_at=1.0)

    limits = QueueLimits(
        max_queue_size=4, max_queued_tokens=30, max_queued_jobs_per_key=2, max_queued_tokens_per_key=15
    )
    job_store.enqueue(submission(job(1, "a"), 10, limits=limits))
    with pytest.raises(LimitReached) as info:
        job_store.enqueue(submission(job(2, "a"), 6, limits=limits))  # 16 tokens for a: past 15
    assert info.value.limit == "max_queued_tokens_per_key" and info.value.load == QueueLoad(1, 10, 1, 10)
    job_store.enqueue(submission(job(3, "a"), 5, limits=limits))
    with pytest.raises(LimitReached, match="max_queued_jobs_per_key"):
        job_store.enqueue(submission(job(4, "a"), 1, limits=limits))
    job_store.enqueue(submission(job(5, "b"), 14, limits=limits))
    with pytest.raises(LimitReached, match="max_queued_tokens"):
        job_store.enqueue(submission(job(6, "c"), 2, limits=limits))  # 31 in all: past the server's 30
    job_store.enqueue(submission(job(7, "c"), 1, limits=limits))
    with pytest.raises(LimitReached, match="max_queue_size"):
        job_store.enqueue(submission(job(8, "d"), 0, limits=limits))
    assert job_store.get("j2") is None and job_store.queue_depth() == 4
