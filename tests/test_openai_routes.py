"""The OpenAI routes and the seed stream route over the fake job service, in process and in front of
a remote gRPC server (``engine serve --grpc-target``): replies, streams, and OpenAI's error body
for every status (401, 400, 429 with Retry-After, 500, 503)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.api.client import EngineClient, InProcessClient, RemoteClient
from engine.api.grpc_service import GrpcServer
from engine.api.openai_routes import mount
from engine.api.rest import create_app
from engine.metrics import Metrics
from harness.api_fakes import FakeStack, open_stack

pytestmark = pytest.mark.anyio


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[FakeStack]:
    async with open_stack(str(tmp_path / "keys.db"), max_queue_size=2) as s:
        yield s


@pytest.fixture(params=["in-process", "remote"])
async def http(request: pytest.FixtureRequest, stack: FakeStack) -> AsyncIterator[httpx.AsyncClient]:
    server = None
    client: EngineClient
    if request.param == "remote":
        server = GrpcServer(stack.servicer, "127.0.0.1:0")
        await server.start()
        client = RemoteClient(f"127.0.0.1:{server.port}")
    else:
        client = InProcessClient(stack.servicer)
    app = create_app(client, Metrics())
    mount(app, client)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://front") as h:
        yield h
    await client.close()
    if server is not None:
        await server.stop(grace_s=0)


def data_lines(text: str) -> list[Any]:
    return [
        line[6:] if line == "data: [DONE]" else json.loads(line[6:])
        for line in text.splitlines()
        if line.startswith("data: ")
    ]


async def test_completion_chat_and_their_streams(http: httpx.AsyncClient, stack: FakeStack) -> None:
    auth = {"Authorization": f"Bearer {stack.alice}"}
    r = await http.post("/v1/completions", json={"prompt": ["ab", "cdef"], "max_tokens": 3}, headers=auth)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["text"] for c in body["choices"]] == ["AB", "CDE"]
    assert [c["finish_reason"] for c in body["choices"]] == ["stop", "length"]
    assert body["usage"] == {"prompt_tokens": 8, "completion_tokens": 5, "total_tokens": 13}
    assert (await http.get("/v1/models", headers=auth)).json()["data"][0]["id"] == "fake/flan-t5"

    r = await http.post(
        "/v1/completions",
        json={"prompt": "xyz", "stream": True, "stream_options": {"include_usage": True}},
        headers={"apiKey": stack.alice},
    )
    assert r.headers["content-type"].startswith("text/event-stream")
    chunks = data_lines(r.text)
    assert chunks[-1] == "[DONE]"
    assert "".join(c["choices"][0]["text"] for c in chunks[:-2]) == "XYZ"
    assert chunks[-2]["choices"] == [] and chunks[-2]["usage"]["completion_tokens"] == 3

    messages = [{"role": "user", "content": "hi"}]
    r = await http.post("/v1/chat/completions", json={"messages": messages, "stream": True}, headers=auth)
    chunks = data_lines(r.text)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[1:-1])
    assert content == "USER: HI\nASSISTANT:"  # the fake upper-cases the chat prompt
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"


async def test_seed_stream_route(http: httpx.AsyncClient, stack: FakeStack) -> None:
    key = {"apiKey": stack.alice}
    r = await http.post("/v1/submit", json={"prompt": ["ab", "c"]}, headers=key)
    job_id = r.json()["data"]["id"]
    r = await http.get(f"/v1/response/{job_id}/stream", headers=key)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert "event: done" in r.text
    done = json.loads(r.text.split("event: done\ndata: ")[1].split("\n")[0])
    assert done["status"] == "completed" and done["completion"] == ["AB", "C"]
    r = await http.get(f"/v1/response/{job_id}/stream", headers={**key, "Last-Event-ID": "x"})
    assert r.status_code == 422 and "Last-Event-ID" in r.json()["error"]["message"]
    r = await http.get(f"/v1/response/{job_id}/stream", headers={"apiKey": stack.bob})
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


async def test_openai_errors_for_every_status(http: httpx.AsyncClient, stack: FakeStack) -> None:
    auth = {"Authorization": f"Bearer {stack.alice}"}

    def check(r: httpx.Response, status: int, kind: str, param: str | None = None) -> dict[str, Any]:
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == kind, err
        assert err["param"] == param, err
        return dict(err)

    check(await http.post("/v1/completions", json={"prompt": "x"}), 401, "authentication_error")
    check(
        await http.post("/v1/completions", json={"prompt": 3}, headers=auth),
        400,
        "invalid_request_error",
        "prompt",
    )
    check(
        await http.post("/v1/completions", json={"prompt": "x", "n": 0}, headers=auth),
        400,
        "invalid_request_error",
        "n",
    )
    err = check(
        await http.post("/v1/completions", json={"prompt": "FAIL"}, headers=auth), 500, "server_error"
    )
    assert "fake was told to FAIL" in err["message"]
    r = await http.post("/v1/completions", json={"prompt": "FAIL", "stream": True}, headers=auth)
    chunks = data_lines(r.text)
    assert chunks[-1] == "[DONE]" and chunks[-2]["error"]["type"] == "server_error"

    stack.service.pause()
    for _ in range(2):
        await http.post("/v1/submit", json={"prompt": "x"}, headers=auth)
    r = await http.post("/v1/completions", json={"prompt": "x"}, headers=auth)
    check(r, 429, "rate_limit_error")
    assert r.headers["Retry-After"] == "3"
    stack.service.resume()
    stack.service.is_ready = False
    check(await http.post("/v1/completions", json={"prompt": "x"}, headers=auth), 503, "service_unavailable")
