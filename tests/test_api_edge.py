"""The edge: body limits on the bytes as they arrive, the key before the body, the gRPC message
limit, one check per limit and one model rule for both transports, and a 4xx (never a 5xx) with a
clear message for every malformed input (issue 11 item 2, issue 14's "each limit defined once and
checked once at the edge"). Real sockets where the point is what crosses them: an in-process
uvicorn with the server's own HTTP protocol, and a grpc.aio server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import uvicorn
from google.protobuf import struct_pb2

from engine.api.body import LINGER_MAX_BYTES, _LingeringTransport, lingering_http_protocol
from engine.api.client import InProcessClient, RemoteClient
from engine.api.grpc_service import GrpcServer
from engine.api.openai_routes import mount as mount_openai_routes
from engine.api.pb import engine_pb2, engine_pb2_grpc
from engine.api.rest import create_app
from engine.config import Config
from engine.limits import MAX_ERROR_MESSAGE_CHARS, MAX_STOP_LENGTH, MAX_STOP_SEQUENCES, RequestLimits
from engine.metrics import Metrics
from harness.api_fakes import INFO, FakeStack, open_stack
from harness.processes import free_port

pytestmark = pytest.mark.anyio

MiB = 1024 * 1024
LIMITS = RequestLimits()  # the defaults: what `engine serve` runs with unless told otherwise


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[FakeStack]:
    # Prompts up to the byte limit reach the fake service (its own char limit out of the way).
    info = replace(INFO, model_source="google/flan-t5-fake")
    async with open_stack(
        str(tmp_path / "keys.db"), info=info, max_prompt_chars=LIMITS.max_prompt_bytes
    ) as s:
        yield s


@pytest.fixture
async def http(stack: FakeStack) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(InProcessClient(stack.servicer), stack.metrics)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        yield client


@pytest.fixture
async def grpc_server(stack: FakeStack) -> AsyncIterator[GrpcServer]:
    srv = GrpcServer(stack.servicer, "127.0.0.1:0")
    await srv.start()
    yield srv
    await srv.stop(0.5)


@pytest.fixture
async def stub(grpc_server: GrpcServer) -> AsyncIterator[Any]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_server.port}") as ch:
        yield engine_pb2_grpc.EngineStub(ch)


@pytest.fixture
async def socket_url(stack: FakeStack) -> AsyncIterator[tuple[str, int]]:
    """The REST app behind a real uvicorn, configured as `engine serve` configures it."""
    app = create_app(InProcessClient(stack.servicer), stack.metrics)
    mount_openai_routes(app, InProcessClient(stack.servicer))
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_config=None, lifespan="off", http=lingering_http_protocol()
    )
    server = uvicorn.Server(config)
    task = asyncio.get_running_loop().create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    yield "127.0.0.1", port
    server.should_exit = True
    await task


def envelope(r: httpx.Response, status: int, code: str, *words: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["success"] is False and body["error"]["code"] == code, body
    message: str = body["error"]["message"]
    for w in words:
        assert w in message, message
    assert len(message) <= MAX_ERROR_MESSAGE_CHARS
    return message


async def rpc_error(call: Any, code: grpc.StatusCode, *words: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    err = info.value
    assert err.code() == code, (err.code(), err.details())
    for w in words:
        assert w in (err.details() or ""), err.details()
    assert len(err.details() or "") <= MAX_ERROR_MESSAGE_CHARS
    return err


def submit(*prompts: str, model: str = "", **params: Any) -> Any:
    s = struct_pb2.Struct()
    s.update(params)
    return engine_pb2.SubmitRequest(prompts=list(prompts), params=s, model=model)


# ---- bodies on the wire -------------------------------------------------------------------------


async def send_chunked(
    host: str, port: int, headers: bytes, total: int, path: bytes = b"/v1/submit"
) -> tuple[int, bytes]:
    """POST ``path`` with a chunked body of ``total`` bytes, reading the reply while sending:
    (bytes the client managed to send, the reply)."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        b"POST %s HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n" % path
        + b"Content-Type: application/json\r\n"
        + headers
        + b"\r\n"
    )
    reply = asyncio.ensure_future(reader.read())
    chunk = b'{"prompt": "' + b"a" * (64 * 1024)
    sent = 0
    try:
        while sent < total and not reply.done():
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await writer.drain()
            sent += len(chunk)
    except ConnectionError:
        pass  # the server closed: the reply says why
    data = await asyncio.wait_for(reply, 10)
    writer.close()
    return sent, data


def reply_status(data: bytes) -> int:
    return int(data.split(b" ", 2)[1])


async def test_a_64_mib_chunked_body_gets_413_as_soon_as_the_limit_passes(
    socket_url: tuple[str, int], stack: FakeStack
) -> None:
    host, port = socket_url
    sent, data = await send_chunked(host, port, b"apiKey: " + stack.alice.encode() + b"\r\n", 64 * MiB)
    assert reply_status(data) == 413, data[:300]
    assert b'"payload_too_large"' in data and b"MiB" in data
    assert b"connection: close" in data.lower()
    # The server stopped reading at the limit: the client got no further than the limit plus what
    # the two sockets' buffers hold, far from the 64 MiB it meant to send.
    assert sent < LIMITS.http_body_bytes + 8 * MiB, sent
    assert stack.service._jobs == {}


async def test_without_a_key_the_body_is_never_read(socket_url: tuple[str, int], stack: FakeStack) -> None:
    host, port = socket_url
    sent, data = await send_chunked(host, port, b"", 64 * MiB)
    assert reply_status(data) == 401, data[:300]
    assert b"missing API key" in data
    assert sent < 8 * MiB, sent  # socket buffers only: not even the limit's worth was read


async def test_the_openai_routes_have_the_same_limit_and_key_first(
    socket_url: tuple[str, int], stack: FakeStack
) -> None:
    host, port = socket_url
    auth = b"Authorization: Bearer " + stack.alice.encode() + b"\r\n"
    for path in (b"/v1/completions", b"/v1/chat/completions"):
        sent, data = await send_chunked(host, port, auth, 64 * MiB, path)
        assert reply_status(data) == 413, data[:300]
        body = json.loads(data.split(b"\r\n\r\n", 1)[1])
        assert body["error"]["code"] == "payload_too_large" and "MiB" in body["error"]["message"]
        assert sent < LIMITS.http_body_bytes + 8 * MiB, sent
        sent, data = await send_chunked(host, port, b"", 64 * MiB, path)
        assert reply_status(data) == 401, data[:300]
        assert json.loads(data.split(b"\r\n\r\n", 1)[1])["error"]["type"] == "authentication_error"
        assert sent < 8 * MiB, sent


async def test_a_declared_length_over_the_limit_is_refused_before_any_byte_is_read(
    socket_url: tuple[str, int], stack: FakeStack
) -> None:
    host, port = socket_url
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        b"POST /v1/submit HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\napiKey: %s\r\n\r\n" % (64 * MiB, stack.alice.encode())
    )
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)  # no body byte was sent
    writer.close()
    assert reply_status(data) == 413 and b"payload_too_large" in data


async def test_a_100_kb_job_id_over_a_socket_is_a_4xx(socket_url: tuple[str, int], stack: FakeStack) -> None:
    host, port = socket_url
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        b"GET /v1/response/%s HTTP/1.1\r\nHost: t\r\napiKey: %s\r\nConnection: close\r\n\r\n"
        % (b"x" * 100_000, stack.alice.encode())
    )
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert 400 <= reply_status(data) < 500, data[:300]
    assert len(data) < 4096  # the message names the id by its start and length, not whole


class FakeTransport:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def is_closing(self) -> bool:
        return "close" in self.calls

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.calls.append("write_eof")

    def resume_reading(self) -> None:
        self.calls.append("resume_reading")

    def close(self) -> None:
        self.calls.append("close")


async def test_only_a_close_with_a_body_still_arriving_lingers() -> None:
    idle = FakeTransport()
    _LingeringTransport(idle, lambda: False).close()  # type: ignore[arg-type]
    assert idle.calls == ["close"]  # an idle keep-alive connection, a reply after the whole body
    busy = FakeTransport()
    lingering = _LingeringTransport(busy, lambda: True)  # type: ignore[arg-type]
    lingering.close()
    assert busy.calls == ["write_eof", "resume_reading"] and lingering.is_closing()
    lingering.discard(LINGER_MAX_BYTES + 1)  # the client keeps sending: closed at the cap
    assert busy.calls[-1] == "close"


async def test_keep_alive_survives_ordinary_requests(socket_url: tuple[str, int], stack: FakeStack) -> None:
    """Only a reply given before its body was read closes the connection."""
    host, port = socket_url
    async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as client:
        for _ in range(3):
            r = await client.post("/v1/submit", json={"prompt": "x"}, headers={"apiKey": stack.alice})
            assert r.status_code == 200 and "connection" not in r.headers
            r = await client.get("/healthz")
            assert r.status_code == 200 and "connection" not in r.headers


async def test_the_largest_valid_request_passes_both_transports(
    http: httpx.AsyncClient, stub: Any, stack: FakeStack
) -> None:
    """The transports' limits are derived from the request limits: a request at every limit at
    once gets through (JSON with every character escaped, protobuf with every byte used)."""
    prompt = "é" * (LIMITS.max_prompt_bytes // 2)  # 2 UTF-8 bytes, 6 as a JSON escape
    prompts = [prompt] * LIMITS.max_prompts
    params = {
        "max_new_tokens": LIMITS.max_new_tokens,
        "min_new_tokens": 0,
        "top_k": 4,
        "penalty_alpha": 0.6,
        "repetition_penalty": 1.0,
        "no_repeat_ngram_size": 0,
        "stop": ["😀" * MAX_STOP_LENGTH] * MAX_STOP_SEQUENCES,  # 4 UTF-8 bytes, 12 as JSON escapes
    }
    body = json.dumps({"prompt": prompts, "params": params, "model": "fake/flan-t5"}).encode()
    assert len(body) > 0.99 * LIMITS.http_body_bytes  # the limit is tight: this request is at it
    r = await http.post("/v1/submit", content=body, headers={"apiKey": stack.alice})
    assert r.status_code == 200, r.text[:300]
    message = submit(*prompts, model="fake/flan-t5", **params)
    assert message.ByteSize() > 0.99 * LIMITS.grpc_message_bytes
    job = await stub.Submit(message, metadata=(("apikey", stack.bob),))
    assert job.num_prompts == LIMITS.max_prompts
    # One byte more in one prompt: refused by the one check, with the limit named.
    over = [*prompts[:-1], prompt + "a"]
    r = await http.post("/v1/submit", json={"prompt": over}, headers={"apiKey": stack.alice})
    envelope(r, 413, "prompt_too_long", "prompt 63", f"{LIMITS.max_prompt_bytes} bytes")
    await rpc_error(
        stub.Submit(submit(*over), metadata=(("apikey", stack.bob),)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "prompt 63",
    )


async def test_grpc_refuses_a_message_larger_than_the_largest_valid_request(
    stub: Any, stack: FakeStack, grpc_server: GrpcServer
) -> None:
    assert stack.servicer.limits.grpc_message_bytes == LIMITS.grpc_message_bytes < 2 * MiB
    huge = submit(*["a" * (LIMITS.max_prompt_bytes)] * (LIMITS.max_prompts + 8))
    assert huge.ByteSize() > LIMITS.grpc_message_bytes
    await rpc_error(
        stub.Submit(huge, metadata=(("apikey", stack.alice),)), grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    assert stack.service._jobs == {}


def test_the_limits_follow_the_configuration() -> None:
    cfg = Config.build(
        {"max_prompt_bytes": 1000, "max_prompts_per_request": 2, "max_new_tokens_limit": 7}, {}
    )
    limits = cfg.request_limits
    assert (limits.max_prompt_bytes, limits.max_prompts, limits.max_new_tokens) == (1000, 2, 7)
    assert limits.grpc_message_bytes < RequestLimits().grpc_message_bytes
    assert limits.http_body_bytes > 3 * 2 * 1000  # two prompts of 1000 bytes, every one escaped


# ---- the key before the body --------------------------------------------------------------------


async def test_the_key_is_checked_before_the_body_is_parsed(
    http: httpx.AsyncClient, stack: FakeStack
) -> None:
    bad_bodies = [b'{"prompt": ', b"[1, 2]", b'{"prompt": "x", "params": {"seed": ' + b"9" * 400 + b"}}"]
    for body in bad_bodies:
        envelope(await http.post("/v1/submit", content=body), 401, "unauthenticated", "missing API key")
        r = await http.post("/v1/submit", content=body, headers={"apiKey": "sk_wrong_key"})
        envelope(r, 401, "unauthenticated", "unknown or revoked")
    envelope(await http.get("/v1/response/abc?wait=soon"), 401, "unauthenticated")
    envelope(await http.get("/v1/response/" + "x" * 60_000), 401, "unauthenticated")


# ---- malformed inputs: a 4xx with a clear message on both transports -------------------------------


async def test_oversized_numbers_are_422_not_500(
    http: httpx.AsyncClient, stub: Any, stack: FakeStack
) -> None:
    key = {"apiKey": stack.alice, "Content-Type": "application/json"}
    for name in ("max_new_tokens", "seed", "temperature", "top_k"):
        for digits in ("9" * 400, "-" + "9" * 400, "1" + "0" * 4000):
            body = b'{"prompt": "x", "params": {"%s": %s}}' % (name.encode(), digits.encode())
            envelope(await http.post("/v1/submit", content=body, headers=key), 422, "invalid_request", name)
    body = b'{"prompt": "x", "params": {"bogus": [%s]}}' % (b"9" * 400)
    envelope(await http.post("/v1/submit", content=body, headers=key), 422, "invalid_request", "bogus")
    # gRPC carries numbers as doubles: the largest it can carry is an infinity.
    for value in (float("inf"), float("-inf"), float("nan"), 1e308):
        await rpc_error(
            stub.Submit(submit("x", max_new_tokens=value), metadata=(("apikey", stack.alice),)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "max_new_tokens",
        )


async def test_wait_nan_and_infinity_are_422(http: httpx.AsyncClient, stub: Any, stack: FakeStack) -> None:
    key = {"apiKey": stack.alice}
    job_id = (await http.post("/v1/submit", json={"prompt": "x"}, headers=key)).json()["data"]["id"]
    for wait in ("nan", "NaN", "inf", "-inf", "Infinity", "1e400", "31", "-0.5"):
        r = await http.get(f"/v1/response/{job_id}?wait={wait}", headers=key)
        envelope(r, 422, "invalid_request", "wait must be between 0 and 30 seconds")
    for wait_s in (float("nan"), float("inf"), -1.0, 30.5):
        await rpc_error(
            stub.GetResult(
                engine_pb2.GetResultRequest(id=job_id, wait_s=wait_s), metadata=(("apikey", stack.alice),)
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "wait must be between 0 and 30",
        )


async def test_malformed_keys_are_401(http: httpx.AsyncClient, stub: Any, stack: FakeStack) -> None:
    # Non-ASCII as HTTP carries it (bytes), control characters, a key of 100 KB.
    for raw in ("ключ".encode(), "sk_é_x".encode(), b"k" * 100_000):
        r = await http.post("/v1/submit", json={"prompt": "x"}, headers=[(b"apiKey", raw)])
        envelope(r, 401, "unauthenticated", "malformed API key", "visible ASCII")
        r = await http.get("/v1/response/abc", headers=[(b"Authorization", b"Bearer " + raw)])
        envelope(r, 401, "unauthenticated", "malformed API key")
    # gRPC: what a client library lets through (ASCII, but too long or with a tab).
    for key in ("k" * 300, "sk x"):
        await rpc_error(
            stub.Submit(submit("x"), metadata=(("apikey", key),)),
            grpc.StatusCode.UNAUTHENTICATED,
            "malformed API key",
        )
    # Info needs no key and does not look at one.
    info = await stub.Info(engine_pb2.InfoRequest(), metadata=(("apikey", "k" * 300),))
    assert info.model == "fake/flan-t5"
    # The streaming calls read the key inside their handler too.
    for call in (
        stub.GenerateStream(submit("x"), metadata=(("apikey", "k" * 300),)),
        stub.StreamResult(engine_pb2.StreamResultRequest(id="0" * 32), metadata=(("apikey", "k" * 300),)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            [m async for m in call]
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, info.value.details()
        assert "malformed API key" in (info.value.details() or "")
    # Larger than gRPC's metadata limit: refused by the transport, still not a server error.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Submit(submit("x"), metadata=(("apikey", "k" * 100_000),))
    assert info.value.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)


async def test_100_kb_job_ids_are_422_with_a_short_message(
    http: httpx.AsyncClient, stub: Any, stack: FakeStack
) -> None:
    key = {"apiKey": stack.alice}
    # (httpx refuses URLs over 64 KiB; a 100 KB id over a raw socket: test_a_100_kb_path_...)
    for job_id in ("x" * 60_000, "a.b", "é" * 10):
        for method in ("GET", "DELETE"):
            r = await http.request(method, f"/v1/response/{job_id}", headers=key)
            envelope(r, 422, "invalid_request", "is not a job id", "at most 64")
        await rpc_error(
            stub.GetResult(engine_pb2.GetResultRequest(id=job_id), metadata=(("apikey", stack.alice),)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "is not a job id",
        )
        await rpc_error(
            stub.Cancel(engine_pb2.CancelRequest(id=job_id), metadata=(("apikey", stack.alice),)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "is not a job id",
        )
    # A well-formed id that is nobody's: still 404.
    envelope(await http.get("/v1/response/" + "0" * 32, headers=key), 404, "not_found")


async def test_huge_values_in_messages_are_cut(http: httpx.AsyncClient, stub: Any, stack: FakeStack) -> None:
    """A message that quotes a client's value stays short: a gRPC status message travels in a
    header of 8 KiB, and a 5xx must not come from a long 4xx."""
    huge = "z" * 200_000
    key = {"apiKey": stack.alice}
    r = await http.post("/v1/submit", json={"prompt": "x", "params": {"seed": huge}}, headers=key)
    envelope(r, 422, "invalid_request", "seed must be an integer")
    r = await http.post("/v1/submit", json={"prompt": "x", "model": huge}, headers=key)
    envelope(r, 422, "invalid_request", "model must be at most 256 characters")
    await rpc_error(
        stub.Submit(submit("x", seed=huge[:100_000]), metadata=(("apikey", stack.alice),)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "seed must be an integer",
    )
    await rpc_error(
        stub.Submit(submit("x", model=huge[:100_000]), metadata=(("apikey", stack.alice),)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "model must be at most 256",
    )


def _ld(field: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (all that a SubmitRequest is made of)."""

    def varint(n: int) -> bytes:
        out = b""
        while n > 0x7F:
            out += bytes([(n & 0x7F) | 0x80])
            n >>= 7
        return out + bytes([n])

    return varint(field << 3 | 2) + varint(len(payload)) + payload


def nested_submit(depth: int) -> bytes:
    """SubmitRequest(prompts=["x"], params={"seed": [[...["x"]...]]}) with ``depth`` lists, as
    bytes: past protobuf's depth limit no client library builds it, but a client can send it."""
    value = _ld(3, b"x")  # Value.string_value
    for _ in range(depth):
        value = _ld(6, _ld(1, value))  # Value.list_value of ListValue.values
    return _ld(1, b"x") + _ld(2, _ld(1, _ld(1, b"seed") + _ld(2, value)))


async def test_nesting_and_undecodable_messages_are_4xx(
    http: httpx.AsyncClient, grpc_server: GrpcServer, stack: FakeStack
) -> None:
    key = {"apiKey": stack.alice, "Content-Type": "application/json"}
    body = b'{"prompt": "x", "params": {"seed": ' + b"[" * 150 + b"]" * 150 + b"}}"
    envelope(await http.post("/v1/submit", content=body, headers=key), 422, "invalid_request", "nests")
    meta = (("apikey", stack.alice),)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_server.port}") as channel:
        for method in ("Submit", "Generate"):
            call = channel.unary_unary(
                f"/engine.v1.Engine/{method}", request_serializer=None, response_deserializer=None
            )
            await rpc_error(call(nested_submit(3), metadata=meta), grpc.StatusCode.INVALID_ARGUMENT, "seed")
            for raw in (nested_submit(200), b"\xff\xff\xff"):
                await rpc_error(
                    call(raw, metadata=meta), grpc.StatusCode.INVALID_ARGUMENT, "cannot be decoded"
                )
        stream = channel.unary_stream(
            "/engine.v1.Engine/GenerateStream", request_serializer=None, response_deserializer=None
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            [m async for m in stream(nested_submit(200), metadata=meta)]
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()


# ---- each limit checked once, at the edge, the same on both transports ---------------------------


async def test_the_limits_and_the_model_rule_are_the_same_on_both_transports(
    http: httpx.AsyncClient, stub: Any, stack: FakeStack
) -> None:
    key = {"apiKey": stack.alice}
    meta = (("apikey", stack.alice),)
    cases: list[tuple[dict[str, Any], int, str, str]] = [
        ({"prompt": ["x"] * 65}, 422, "invalid_request", "too many prompts: 65; at most 64 prompts"),
        (
            {"prompt": "x", "params": {"max_new_tokens": 513}},
            422,
            "invalid_request",
            "between 1 and 512, got 513",
        ),
        ({"prompt": "x", "model": "other"}, 422, "invalid_request", "model 'other' is not served here"),
        ({"prompt": "y" * (LIMITS.max_prompt_bytes + 1)}, 413, "prompt_too_long", "prompt 0 is 16385 bytes"),
    ]
    for body, status, code, words in cases:
        envelope(await http.post("/v1/submit", json=body, headers=key), status, code, words)
        prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        request = submit(*prompts, model=body.get("model", ""), **body.get("params", {}))
        grpc_code = grpc.StatusCode.INVALID_ARGUMENT
        for call in (stub.Submit, stub.Generate):
            await rpc_error(call(request, metadata=meta), grpc_code, words)
    # The served model by its folder name or by the checkpoint it came from, on both.
    for model in ("fake/flan-t5", "google/flan-t5-fake"):
        r = await http.post("/v1/submit", json={"prompt": "x", "model": model}, headers=key)
        assert r.status_code == 200, r.text
        job = await stub.Generate(submit("x", model=model), metadata=meta)
        assert job.status == engine_pb2.JOB_STATUS_COMPLETED


async def test_a_remote_shim_keeps_malformed_input_off_the_channel(
    stack: FakeStack, grpc_server: GrpcServer
) -> None:
    """REST in front of a remote gRPC server (--grpc-target): wait=nan must not become a gRPC
    deadline, a non-ASCII key must not reach the gRPC library, a missing key is refused before
    the body is read."""
    client = RemoteClient(f"127.0.0.1:{grpc_server.port}")
    app = create_app(client, Metrics())
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            envelope(
                await http.post("/v1/submit", content=b"{not json"), 401, "unauthenticated", "missing API key"
            )
            r = await http.post("/v1/submit", json={"prompt": "x"}, headers=[(b"apiKey", "ключ".encode())])
            envelope(r, 401, "unauthenticated", "malformed API key")
            r = await http.post("/v1/submit", json={"prompt": "x"}, headers={"apiKey": stack.alice})
            job_id = r.json()["data"]["id"]
            for wait in ("nan", "inf"):
                r = await http.get(f"/v1/response/{job_id}?wait={wait}", headers={"apiKey": stack.alice})
                envelope(r, 422, "invalid_request", "wait must be between 0 and 30")
            r = await http.get("/v1/response/" + "x" * 60_000, headers={"apiKey": stack.alice})
            envelope(r, 422, "invalid_request", "is not a job id")
    finally:
        await client.close()
