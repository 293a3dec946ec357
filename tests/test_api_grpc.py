"""The gRPC service over real sockets (grpc.aio server and client) against the fake job service,
and the REST shim forwarding to it as a remote gRPC server (--grpc-target mode)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from engine.api.client import RemoteClient
from engine.api.grpc_service import GrpcServer
from engine.api.pb import engine_pb2, engine_pb2_grpc
from engine.api.rest import create_app
from engine.metrics import Metrics
from harness.api_fakes import FakeStack, open_stack

pytestmark = pytest.mark.anyio


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[FakeStack]:
    async with open_stack(str(tmp_path / "keys.db"), max_queue_size=2, max_prompt_chars=50) as s:
        yield s


@pytest.fixture
async def server(stack: FakeStack) -> AsyncIterator[GrpcServer]:
    srv = GrpcServer(stack.servicer, "127.0.0.1:0")
    await srv.start()
    yield srv
    await srv.stop(0.5)


@pytest.fixture
async def channel(server: GrpcServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


def md(key: str) -> tuple[tuple[str, str], ...]:
    return (("apikey", key),)


def request(*prompts: str, **params: Any) -> Any:
    s = struct_pb2.Struct()
    s.update(params)
    return engine_pb2.SubmitRequest(prompts=list(prompts), params=s)


def trailers(err: grpc.aio.AioRpcError) -> dict[str, str]:
    pairs: Any = err.trailing_metadata() or ()
    return {k: v for k, v in pairs}


async def test_submit_get_result_generate(channel: grpc.aio.Channel, stack: FakeStack) -> None:
    stub = engine_pb2_grpc.EngineStub(channel)
    job = await stub.Submit(request("hello", "world", max_new_tokens=4), metadata=md(stack.alice))
    assert job.status == engine_pb2.JOB_STATUS_QUEUED and job.queue_position == 0 and job.num_prompts == 2
    done = await stub.GetResult(engine_pb2.GetResultRequest(id=job.id, wait_s=10), metadata=md(stack.alice))
    assert done.status == engine_pb2.JOB_STATUS_COMPLETED
    assert list(done.result.completion) == ["HELL", "WORL"]
    assert [list(t.ids) for t in done.result.token_ids] == [[72, 69, 76, 76], [87, 79, 82, 76]]
    assert list(done.result.finish_reasons) == [engine_pb2.FINISH_REASON_LENGTH] * 2
    assert (
        done.result.usage.prompt_tokens,
        done.result.usage.completion_tokens,
        done.result.usage.total_tokens,
    ) == (
        12,
        8,
        20,
    )
    assert done.model == "fake/flan-t5"
    gen = await stub.Generate(request("abc"), metadata=md(stack.alice))
    assert gen.status == engine_pb2.JOB_STATUS_COMPLETED and list(gen.result.completion) == ["ABC"]
    assert list(gen.result.finish_reasons) == [engine_pb2.FINISH_REASON_EOS]


async def test_generate_stream_sends_tokens_as_they_come(channel: grpc.aio.Channel, stack: FakeStack) -> None:
    stack.service.token_delay_s = 0.002
    stub = engine_pb2_grpc.EngineStub(channel)
    messages = [m async for m in stub.GenerateStream(request("hey", "you!"), metadata=md(stack.alice))]
    first, last = messages[0], messages[-1]
    assert first.WhichOneof("event") == "job" and first.job.status == engine_pb2.JOB_STATUS_QUEUED
    assert last.WhichOneof("event") == "job" and last.job.status == engine_pb2.JOB_STATUS_COMPLETED
    tokens = [m.token for m in messages[1:-1]]
    assert all(m.WhichOneof("event") == "token" for m in messages[1:-1])
    texts = ["", ""]
    for t in tokens:
        assert t.job_id == first.job.id
        texts[t.prompt_index] += t.text
    assert texts == ["HEY", "YOU!"] == list(last.job.result.completion)
    by_prompt = [[t.token_id for t in tokens if t.prompt_index == i] for i in range(2)]
    assert by_prompt == [[72, 69, 89, -1], [89, 79, 85, 33, -1]]
    finished = [t for t in tokens if t.finished]
    assert [t.finish_reason for t in finished] == [engine_pb2.FINISH_REASON_EOS] * 2


async def test_stream_client_cancel_cancels_the_job(channel: grpc.aio.Channel, stack: FakeStack) -> None:
    stub = engine_pb2_grpc.EngineStub(channel)
    call = stub.GenerateStream(request("HOLD"), metadata=md(stack.alice))
    first = await call.read()
    call.cancel()
    for _ in range(200):
        if first.job.id in stack.service.cancelled:
            break
        await asyncio.sleep(0.01)
    assert stack.service.cancelled == [first.job.id]


async def test_cancel(channel: grpc.aio.Channel, stack: FakeStack) -> None:
    stack.service.pause()
    stub = engine_pb2_grpc.EngineStub(channel)
    job = await stub.Submit(request("x"), metadata=md(stack.alice))
    cancelled = await stub.Cancel(engine_pb2.CancelRequest(id=job.id), metadata=md(stack.alice))
    assert cancelled.status == engine_pb2.JOB_STATUS_CANCELLED
    stack.service.resume()


async def expect_error(call: Any, code: grpc.StatusCode, error_code: str, *words: str) -> dict[str, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    err = info.value
    assert err.code() == code, err.details()
    t = trailers(err)
    assert t["error-code"] == error_code
    for w in words:
        assert w in (err.details() or ""), err.details()
    return t


async def test_status_codes(channel: grpc.aio.Channel, stack: FakeStack) -> None:
    stub = engine_pb2_grpc.EngineStub(channel)
    a = md(stack.alice)
    await expect_error(
        stub.Submit(request("x")), grpc.StatusCode.UNAUTHENTICATED, "unauthenticated", "apikey"
    )
    await expect_error(
        stub.Submit(request("x"), metadata=md("ek_1_2")), grpc.StatusCode.UNAUTHENTICATED, "unauthenticated"
    )
    await expect_error(
        stub.Submit(request("x", max_tokens=3), metadata=a),
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid_request",
        "unknown parameter(s) max_tokens",
    )
    await expect_error(
        stub.Submit(request("x", top_k=2.5), metadata=a),
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid_request",
        "top_k must be an integer, got 2.5",
    )
    await expect_error(
        stub.Submit(request("y" * 51), metadata=a),
        grpc.StatusCode.INVALID_ARGUMENT,
        "prompt_too_long",
        "1 over",
    )
    await expect_error(
        stub.Submit(request(), metadata=a), grpc.StatusCode.INVALID_ARGUMENT, "invalid_request"
    )
    await expect_error(
        stub.GetResult(engine_pb2.GetResultRequest(id=""), metadata=a),
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid_request",
        "id is required",
    )
    job = await stub.Submit(request("x"), metadata=a)
    await expect_error(
        stub.GetResult(engine_pb2.GetResultRequest(id=job.id), metadata=md(stack.bob)),
        grpc.StatusCode.NOT_FOUND,
        "not_found",
    )
    await expect_error(
        stub.Generate(request("FAIL"), metadata=a), grpc.StatusCode.INTERNAL, "job_failed", "the job failed"
    )
    stack.service.pause()
    for _ in range(2):
        await stub.Submit(request("x"), metadata=a)
    t = await expect_error(
        stub.Submit(request("x"), metadata=a), grpc.StatusCode.RESOURCE_EXHAUSTED, "overloaded"
    )
    assert t["retry-after"] == "3"
    stack.service.resume()
    stack.service.is_ready = False
    await expect_error(stub.Submit(request("x"), metadata=a), grpc.StatusCode.UNAVAILABLE, "not_ready")


async def test_health_and_reflection(channel: grpc.aio.Channel, stack: FakeStack, server: GrpcServer) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "engine.v1.Engine"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    stack.service.is_ready = False
    for _ in range(100):
        reply = await health.Check(health_pb2.HealthCheckRequest(service="engine.v1.Engine"))
        if reply.status == health_pb2.HealthCheckResponse.NOT_SERVING:
            break
        await asyncio.sleep(0.05)
    assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING

    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    reply = await call.read()
    names = {s.name for s in reply.list_services_response.service}
    assert {"engine.v1.Engine", "grpc.health.v1.Health"} <= names
    await call.write(reflection_pb2.ServerReflectionRequest(file_containing_symbol="engine.v1.Engine"))
    reply = await call.read()
    assert reply.file_descriptor_response.file_descriptor_proto
    await call.done_writing()


async def test_grpc_requests_are_counted(channel: grpc.aio.Channel, stack: FakeStack) -> None:
    stub = engine_pb2_grpc.EngineStub(channel)
    await stub.Submit(request("x"), metadata=md(stack.alice))
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.Submit(request("x"))
    text = stack.metrics.render().decode()
    assert 'engine_requests_total{code="OK",route="/engine.v1.Engine/Submit"} 1.0' in text
    assert 'engine_requests_total{code="UNAUTHENTICATED",route="/engine.v1.Engine/Submit"} 1.0' in text


async def test_rest_shim_against_a_remote_grpc_server(server: GrpcServer, stack: FakeStack) -> None:
    client = RemoteClient(f"127.0.0.1:{server.port}")
    app = create_app(client, Metrics())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://front:80") as http:
        key = {"apiKey": stack.alice}
        r = await http.post(
            "/v1/submit", json={"prompt": ["ab", "cd"], "params": {"max_new_tokens": 8}}, headers=key
        )
        assert r.status_code == 200, r.text
        job_id = r.json()["data"]["id"]
        assert r.json()["data"]["responseUrl"] == f"http://front/v1/response/{job_id}"
        r = await http.get(f"/v1/response/{job_id}?wait=10", headers=key)
        assert r.json()["data"]["completion"] == ["AB", "CD"]
        assert r.json()["data"]["usage"] == {"prompt_tokens": 6, "completion_tokens": 4, "total_tokens": 10}

        def check(r: httpx.Response, status: int, code: str) -> None:
            assert r.status_code == status, r.text
            assert r.json()["error"]["code"] == code

        check(await http.post("/v1/submit", json={"prompt": "x"}), 401, "unauthenticated")
        check(await http.get(f"/v1/response/{job_id}", headers={"apiKey": stack.bob}), 404, "not_found")
        r = await http.post("/v1/submit", json={"prompt": "x", "params": {"nope": 1}}, headers=key)
        check(r, 422, "invalid_request")
        assert "unknown parameter(s) nope" in r.json()["error"]["message"]
        check(await http.post("/v1/submit", json={"prompt": "z" * 51}, headers=key), 413, "prompt_too_long")
        r = await http.post("/v1/submit", json={"prompt": "FAIL"}, headers=key)
        check(
            await http.get(f"/v1/response/{r.json()['data']['id']}?wait=10", headers=key), 500, "job_failed"
        )
        stack.service.pause()
        for _ in range(2):
            await http.post("/v1/submit", json={"prompt": "x"}, headers=key)
        r = await http.post("/v1/submit", json={"prompt": "x"}, headers=key)
        check(r, 429, "overloaded")
        assert r.headers["Retry-After"] == "3"
        stack.service.resume()
        assert (await http.get("/v1/info")).json()["model"] == "fake/flan-t5"
        assert (await http.get("/readyz")).status_code == 200
        stack.service.is_ready = False
        await asyncio.sleep(0.6)  # the health status follows within 0.25 s
        check(await http.get("/readyz"), 503, "not_ready")
    await client.close()


async def test_rest_shim_with_an_unreachable_grpc_server() -> None:
    client = RemoteClient("127.0.0.1:1", timeout_s=2.0)
    app = create_app(client, Metrics())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://front") as http:
        r = await http.post("/v1/submit", json={"prompt": "x"}, headers={"apiKey": "k"})
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "not_ready"
        assert (await http.get("/readyz")).status_code == 503
    await client.close()


def test_generated_code_is_current_and_imports_our_package() -> None:
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    grpc_module = (root / "engine" / "pb" / "engine" / "v1" / "engine_pb2_grpc.py").read_text()
    assert "from engine.pb.engine.v1 import engine_pb2" in grpc_module
    assert "from engine.v1 import" not in grpc_module
    check = subprocess.run(
        [sys.executable, str(root / "scripts" / "gen_proto.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stderr
