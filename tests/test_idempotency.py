"""Idempotent submits: the same API key and idempotency key answer the same job instead of a new
one, while the store holds it (result_ttl_s after its end), across a restart and across servers
sharing a Redis store; REST's Idempotency-Key header and gRPC's idempotency-key metadata."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import httpx
import pytest

from engine.api.auth import Authenticator, SqliteKeyStore, create_key
from engine.api.client import InProcessClient, RemoteClient
from engine.api.grpc_service import EngineServicer, GrpcServer
from engine.api.openai_routes import mount
from engine.api.pb import engine_pb2, engine_pb2_grpc
from engine.api.rest import create_app
from engine.errors import InvalidRequest
from engine.metrics import Metrics
from engine.runtime.params import DecodingParams
from engine.serving.jobs import Job, JobStatus
from engine.serving.service import JobService
from engine.serving.store.base import JobStore, Replay
from engine.serving.store.sqlite import SqliteJobStore
from harness.api_fakes import INFO, fake_decode
from harness.fakes import FakeEngine, start_service, until
from tests.stores import submission
from tests.test_store import result

P = DecodingParams(max_new_tokens=4)


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), timeout=60))


def job(n: int, owner: str = "a") -> Job:
    return Job(id=f"j{n}", owner=owner, prompts=("p",), params=P, created_at=1.0)


def test_the_store_answers_a_repeated_key_with_the_first_job(job_store: JobStore) -> None:
    job_store.enqueue(submission(job(1), 2, idempotency_key="k1"))
    with pytest.raises(Replay) as info:
        job_store.enqueue(submission(job(2), 2, idempotency_key="k1"))
    assert info.value.job_id == "j1" and job_store.get("j2") is None
    assert job_store.find_idempotent("a", "k1") == "j1"
    assert job_store.find_idempotent("a", "other") is None
    # another API key's idempotency keys are its own
    job_store.enqueue(submission(job(3, owner="b"), 2, idempotency_key="k1"))
    # owner and key never run together
    job_store.enqueue(submission(job(4, owner="a:k"), 2, idempotency_key="1"))
    assert job_store.find_idempotent("a:k", "1") == "j4" and job_store.find_idempotent("a", "k:1") is None
    job_store.enqueue(submission(job(5), 2))  # no key: always a new job
    [claimed] = job_store.claim(["j1"], 2.0)
    job_store.complete("j1", claimed.attempts, result(), 3.0)
    with pytest.raises(Replay):  # finished but kept: still the same job
        job_store.enqueue(submission(job(6), 2, idempotency_key="k1"))
    assert job_store.purge_expired(now=100.0, ttl_s=10.0) == 1  # its result expired: the key is free
    assert job_store.find_idempotent("a", "k1") is None
    job_store.enqueue(submission(job(7), 2, idempotency_key="k1"))
    assert job_store.find_idempotent("a", "k1") == "j7"


def test_a_retried_submit_gets_the_same_job(job_store: JobStore) -> None:
    async def body() -> None:
        svc = await start_service(FakeEngine(), store=job_store)
        first = await svc.submit("a", ["hello"], P, idempotency_key="retry-1")
        again = await svc.submit("a", ["hello"], P, idempotency_key="retry-1")
        assert again.job.id == first.job.id
        # Concurrent retries (one group commit on SQLite) still make one job.
        views = await asyncio.gather(*(svc.submit("a", ["x"], P, idempotency_key="burst") for _ in range(5)))
        assert len({v.job.id for v in views}) == 1
        done = await svc.wait("a", first.job.id, 10)
        assert done.job.status is JobStatus.COMPLETED
        late = await svc.submit("a", ["hello"], P, idempotency_key="retry-1")
        assert late.job.id == first.job.id and late.job.status is JobStatus.COMPLETED
        other = await svc.submit("b", ["hello"], P, idempotency_key="retry-1")
        assert other.job.id != first.job.id
        with pytest.raises(InvalidRequest, match="used for a different request"):
            await svc.submit("a", ["changed"], P, idempotency_key="retry-1")
        for bad in ("", "x" * 256, "caf\u00e9", "tab\there"):
            with pytest.raises(InvalidRequest, match="idempotency key must be 1 to 255 printable ASCII"):
                await svc.submit("a", ["hello"], P, idempotency_key=bad)
        assert (
            job_store.count(JobStatus.COMPLETED)
            + job_store.queue_depth()
            + job_store.count(JobStatus.RUNNING)
            == 3
        )  # first, burst, other
        await svc.stop()

    run(body)


def test_the_same_job_after_a_restart_sqlite(tmp_path: Path) -> None:
    async def body() -> None:
        path = tmp_path / "engine.db"
        svc = await start_service(FakeEngine(), store=SqliteJobStore(path))
        first = await svc.submit("a", ["hello"], P, idempotency_key="k")
        await svc.stop()  # closes the store
        svc = await start_service(FakeEngine(), store=SqliteJobStore(path))
        assert (await svc.submit("a", ["hello"], P, idempotency_key="k")).job.id == first.job.id
        await svc.stop()

    run(body)


def test_the_same_job_after_a_restart_and_on_another_server_redis(
    redis_stores: Callable[[], JobStore],
) -> None:
    async def body() -> None:
        one = await start_service(FakeEngine(), store=redis_stores())
        two = await start_service(FakeEngine(), store=redis_stores())
        first = await one.submit("a", ["hello"], P, idempotency_key="k")
        assert (await two.submit("a", ["hello"], P, idempotency_key="k")).job.id == first.job.id
        await one.stop()
        one = await start_service(FakeEngine(), store=redis_stores())
        assert (await one.submit("a", ["hello"], P, idempotency_key="k")).job.id == first.job.id
        await one.stop()
        await two.stop()

    run(body)


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[tuple[JobService, EngineServicer, str]]:
    svc = await start_service(FakeEngine())
    keys = SqliteKeyStore(str(tmp_path / "keys.db"))
    alice = create_key(keys, "alice")
    servicer = EngineServicer(svc, Authenticator(keys), INFO, metrics=Metrics(), decode=fake_decode)
    yield svc, servicer, alice
    await svc.stop()
    keys.close()


@pytest.mark.anyio
async def test_rest_idempotency_key_header(stack: tuple[JobService, EngineServicer, str]) -> None:
    _svc, servicer, alice = stack
    app = create_app(InProcessClient(servicer), Metrics())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
        headers = {"apiKey": alice, "Idempotency-Key": "order-17"}
        first = await http.post("/v1/submit", json={"prompt": "hi"}, headers=headers)
        again = await http.post("/v1/submit", json={"prompt": "hi"}, headers=headers)
        assert first.status_code == again.status_code == 200, again.text
        assert first.json()["data"]["id"] == again.json()["data"]["id"]
        plain = await http.post("/v1/submit", json={"prompt": "hi"}, headers={"apiKey": alice})
        assert plain.json()["data"]["id"] != first.json()["data"]["id"]
        bad = await http.post(
            "/v1/submit", json={"prompt": "hi"}, headers={"apiKey": alice, "Idempotency-Key": ""}
        )
        assert bad.status_code == 422 and "idempotency key" in bad.json()["error"]["message"]


@pytest.mark.anyio
async def test_grpc_idempotency_key_metadata(stack: tuple[JobService, EngineServicer, str]) -> None:
    _svc, servicer, alice = stack
    server = GrpcServer(servicer, "127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = engine_pb2_grpc.EngineStub(channel)
            req = engine_pb2.SubmitRequest(prompts=["hi"])
            md = (("apikey", alice), ("idempotency-key", "order-17"))
            first = await stub.Submit(req, metadata=md)
            again = await stub.Submit(req, metadata=md)
            plain = await stub.Submit(req, metadata=(("apikey", alice),))
            assert first.id == again.id != plain.id
        # The REST shim in front of a remote gRPC server (--grpc-target) passes the header on.
        remote = RemoteClient(f"127.0.0.1:{server.port}")
        try:
            assert (await remote.submit(alice, req, "order-17")).id == first.id
        finally:
            await remote.close()
    finally:
        await server.stop(0.5)


@pytest.fixture
async def gated(tmp_path: Path) -> AsyncIterator[tuple[JobService, EngineServicer, str, threading.Event]]:
    """A stack whose engine holds every job until the test opens the gate."""
    gate = threading.Event()
    svc = await start_service(FakeEngine(gate=gate))
    keys = SqliteKeyStore(str(tmp_path / "keys.db"))
    alice = create_key(keys, "alice")
    servicer = EngineServicer(svc, Authenticator(keys), INFO, metrics=Metrics(), decode=fake_decode)
    yield svc, servicer, alice, gate
    gate.set()
    await svc.stop()
    keys.close()


def _one_job_ran(svc: JobService) -> None:
    assert svc.store.count(JobStatus.COMPLETED) == 1
    assert svc.store.count(JobStatus.CANCELLED) == 0


@pytest.mark.anyio
async def test_a_generate_retried_after_a_lost_reply_attaches_to_the_same_job(
    gated: tuple[JobService, EngineServicer, str, threading.Event],
) -> None:
    svc, servicer, alice, gate = gated
    server = GrpcServer(servicer, "127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = engine_pb2_grpc.EngineStub(channel)
            req = engine_pb2.SubmitRequest(prompts=["hi"])
            md = (("apikey", alice), ("idempotency-key", "gen-1"))
            # The reply is lost (the client's deadline): with a key the job is not cancelled.
            with pytest.raises(grpc.aio.AioRpcError) as lost:
                await stub.Generate(req, metadata=md, timeout=0.3)
            assert lost.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            assert svc.store.count(JobStatus.CANCELLED) == 0
            gate.set()
            reply = await stub.Generate(req, metadata=md)
            assert engine_pb2.JobStatus.Name(reply.status) == "JOB_STATUS_COMPLETED"
            _one_job_ran(svc)
            again = await stub.Generate(req, metadata=md)  # after the end: the same job, at once
            assert again.id == reply.id
            _one_job_ran(svc)

            # GenerateStream: the first stream goes away after the job message; the retry
            # attaches to the same job and gets its tokens and its end.
            gate.clear()
            smd = (("apikey", alice), ("idempotency-key", "stream-1"))
            first = stub.GenerateStream(req, metadata=smd)
            head = await first.read()
            first.cancel()
            gate.set()
            messages = [m async for m in stub.GenerateStream(req, metadata=smd)]
            assert messages[0].job.id == head.job.id
            assert [m.token.token_id for m in messages if m.HasField("token") and m.token.finished]
            assert engine_pb2.JobStatus.Name(messages[-1].job.status) == "JOB_STATUS_COMPLETED"
            assert messages[-1].job.id == head.job.id
            assert svc.store.count(JobStatus.CANCELLED) == 0

            # Without a key, a Generate that loses its client still cancels its job.
            gate.clear()
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.Generate(req, metadata=(("apikey", alice),), timeout=0.3)
            await until(lambda: svc.store.count(JobStatus.CANCELLED) == 1)
        # The REST shim in front of a remote gRPC server (--grpc-target) passes the key on.
        gate.set()
        remote = RemoteClient(f"127.0.0.1:{server.port}")
        try:
            assert (await remote.generate(alice, req, "gen-1")).id == reply.id
            streamed = [m async for m in remote.generate_stream(alice, req, "stream-1")]
            assert streamed[0].job.id == head.job.id
        finally:
            await remote.close()
    finally:
        await server.stop(0.5)


@pytest.mark.anyio
async def test_openai_routes_honour_the_idempotency_key_header(
    gated: tuple[JobService, EngineServicer, str, threading.Event],
) -> None:
    svc, servicer, alice, gate = gated
    gate.set()
    client = InProcessClient(servicer)
    app = create_app(client, Metrics())
    mount(app, client)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
        headers = {"Authorization": f"Bearer {alice}", "Idempotency-Key": "oa-1"}
        body = {"prompt": "hi", "max_tokens": 3}
        first = await http.post("/v1/completions", json=body, headers=headers)
        again = await http.post("/v1/completions", json=body, headers=headers)
        assert first.status_code == again.status_code == 200, again.text
        assert first.json()["id"] == again.json()["id"]
        assert first.json()["choices"] == again.json()["choices"]
        _one_job_ran(svc)
        streamed = await http.post("/v1/completions", json={**body, "stream": True}, headers=headers)
        assert streamed.status_code == 200
        assert (
            f'"id": "{first.json()["id"]}"' in streamed.text
            or f'"id":"{first.json()["id"]}"' in streamed.text
        )
        _one_job_ran(svc)
        other = await http.post("/v1/completions", json={**body, "max_tokens": 2}, headers=headers)
        assert other.status_code == 400 and "Idempotency-Key" in other.json()["error"]["message"]
        chat = await http.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
            headers={**headers, "Idempotency-Key": "oa-2"},
        )
        chat_again = await http.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
            headers={**headers, "Idempotency-Key": "oa-2"},
        )
        assert chat.status_code == 200, chat.text
        assert chat.json()["id"] == chat_again.json()["id"]
        assert svc.store.count(JobStatus.COMPLETED) == 2
