"""The REST shim in process (httpx over ASGI) against the fake job service: routes, bodies, the
error envelope for every error, auth, metrics and the OpenAPI schema."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from engine._version import __version__
from engine.api.client import InProcessClient
from engine.api.rest import EngineApp, ResponseResponse, SubmitResponse, create_app
from harness.api_fakes import FakeStack, open_stack

pytestmark = pytest.mark.anyio


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[FakeStack]:
    async with open_stack(str(tmp_path / "keys.db"), max_queue_size=3, max_prompt_chars=50) as s:
        yield s


@pytest.fixture
async def http(stack: FakeStack) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(InProcessClient(stack.servicer), stack.metrics)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver:8080") as client:
        yield client


def assert_error(r: httpx.Response, status: int, code: str, *words: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["success"] is False
    assert set(body) == {"success", "error"}
    assert body["error"]["code"] == code
    for w in words:
        assert w in body["error"]["message"], body["error"]["message"]
    return body


async def poll(http: httpx.AsyncClient, job_id: str, key: str) -> httpx.Response:
    for _ in range(500):
        r = await http.get(f"/v1/response/{job_id}", headers={"apiKey": key})
        if r.status_code != 200 or r.json()["data"]["completion"] is not None:
            return r
        if r.json()["data"]["status"] == "cancelled":
            return r
        await asyncio.sleep(0.005)
    raise AssertionError("job never finished")


async def test_seed_flow_submit_then_poll(http: httpx.AsyncClient, stack: FakeStack) -> None:
    body = {"prompt": "bolognese recipe", "params": {"max_new_tokens": 64, "top_k": 4, "penalty_alpha": 0.6}}
    r = await http.post("/v1/submit", json=body, headers={"apiKey": stack.alice})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert r.json()["success"] is True
    assert data["queuePosition"] == "0"
    assert data["responseUrl"] == f"http://testserver:8080/v1/response/{data['id']}"
    SubmitResponse.model_validate(r.json())
    r = await poll(http, data["id"], stack.alice)
    ResponseResponse.model_validate(r.json())
    out = r.json()["data"]
    assert out == {
        "id": data["id"],
        "status": "completed",
        "queuePosition": "0",
        "completion": ["BOLOGNESE RECIPE"],
        "usage": {"prompt_tokens": 17, "completion_tokens": 16, "total_tokens": 33},
        "finishReason": ["eos"],
        "tokenIds": [[ord(c) for c in "BOLOGNESE RECIPE"]],
    }


async def test_prompt_array_bearer_and_missing_or_empty_params(
    http: httpx.AsyncClient, stack: FakeStack
) -> None:
    auth = {"Authorization": f"Bearer {stack.alice}"}
    params: object
    for params in ({}, None, "absent"):
        body: dict[str, Any] = {"prompt": ["one", "two", ""]}
        if params != "absent":
            body["params"] = params
        r = await http.post("/v1/submit", json=body, headers=auth)
        assert r.status_code == 200, r.text
        out = (await poll(http, r.json()["data"]["id"], stack.alice)).json()["data"]
        assert out["completion"] == ["ONE", "TWO", ""]
    # JSON labelled as a form (what `curl -d` sends) is still JSON.
    r = await http.post(
        "/v1/submit",
        content=b'{"prompt": "curl"}',
        headers={**auth, "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 200, r.text
    # max_new_tokens reaches the service as an int.
    r = await http.post(
        "/v1/submit", json={"prompt": "abcdef", "params": {"max_new_tokens": 3}}, headers=auth
    )
    assert (await poll(http, r.json()["data"]["id"], stack.alice)).json()["data"]["completion"] == ["ABC"]


async def test_queue_position_is_a_string_while_waiting(http: httpx.AsyncClient, stack: FakeStack) -> None:
    stack.service.pause()
    key = {"apiKey": stack.alice}
    ids = []
    for i in range(3):
        r = await http.post("/v1/submit", json={"prompt": f"p{i}"}, headers=key)
        ids.append(r.json()["data"]["id"])
        assert r.json()["data"]["queuePosition"] == str(i)
    r = await http.get(f"/v1/response/{ids[2]}", headers=key)
    assert r.json()["data"] == {
        "id": ids[2],
        "status": "queued",
        "queuePosition": "2",
        "completion": None,
        "usage": None,
        "finishReason": None,
        "tokenIds": None,
    }
    # The queue holds 3: the next is 429 with Retry-After.
    r = await http.post("/v1/submit", json={"prompt": "x"}, headers=key)
    assert_error(r, 429, "overloaded", "queue")
    assert r.headers["Retry-After"] == "3"
    stack.service.resume()
    assert (await poll(http, ids[2], stack.alice)).json()["data"]["completion"] == ["P2"]


async def test_auth_errors(http: httpx.AsyncClient, stack: FakeStack) -> None:
    body = {"prompt": "x", "params": {}}
    assert_error(await http.post("/v1/submit", json=body), 401, "unauthenticated", "apiKey", "keys create")
    bad = stack.alice[:-4] + "AAAA"
    assert_error(await http.post("/v1/submit", json=body, headers={"apiKey": bad}), 401, "unauthenticated")
    assert_error(
        await http.post("/v1/submit", json=body, headers={"apiKey": "nonsense"}), 401, "unauthenticated"
    )
    assert_error(
        await http.post("/v1/submit", json=body, headers={"Authorization": "Basic abc"}),
        401,
        "unauthenticated",
    )
    r = await http.post("/v1/submit", json=body, headers={"apiKey": stack.alice})
    job_id = r.json()["data"]["id"]
    assert_error(await http.get(f"/v1/response/{job_id}"), 401, "unauthenticated")
    # Another key's job is indistinguishable from an unknown one.
    err = assert_error(
        await http.get(f"/v1/response/{job_id}", headers={"apiKey": stack.bob}), 404, "not_found"
    )
    assert job_id in err["error"]["message"]
    assert_error(await http.delete(f"/v1/response/{job_id}", headers={"apiKey": stack.bob}), 404, "not_found")
    assert_error(await http.get("/v1/response/nope", headers={"apiKey": stack.alice}), 404, "not_found")


async def test_invalid_bodies_and_params_answer_422_in_the_envelope(
    http: httpx.AsyncClient, stack: FakeStack
) -> None:
    key = {"apiKey": stack.alice, "Content-Type": "application/json"}
    cases: list[tuple[Any, tuple[str, ...]]] = [
        (b'{"prompt": "x", ', ("not valid JSON",)),
        (b"", ("request body is required",)),
        (b"[1, 2]", ("must be a JSON object",)),
        (b'"just a string"', ("must be a JSON object",)),
        ({"params": {}}, ("prompt is required",)),
        ({"prompt": 5}, ("prompt must be a string or an array of strings",)),
        ({"prompt": ["a", 3]}, ("prompt must be a string or an array of strings",)),
        ({"prompt": None}, ("prompt must be a string",)),
        ({"prompt": "x", "params": []}, ("params must be a JSON object",)),
        ({"prompt": "x", "params": "max_new_tokens=3"}, ("params must be a JSON object",)),
        ({"prompt": "x", "apiKey": "k"}, ("unknown field 'apiKey'", "prompt, params, model")),
        ({"prompt": "x", "params": {"max_tokens": 5}}, ("unknown parameter(s) max_tokens", "max_new_tokens")),
        (
            {"prompt": "x", "params": {"max_new_tokens": 0}},
            ("max_new_tokens must be between 1 and 512, got 0",),
        ),
        ({"prompt": "x", "params": {"max_new_tokens": 100000}}, ("max_new_tokens", "100000")),
        ({"prompt": "x", "params": {"max_new_tokens": "64"}}, ("max_new_tokens must be an integer",)),
        ({"prompt": "x", "params": {"max_new_tokens": 6.5}}, ("max_new_tokens must be an integer, got 6.5",)),
        ({"prompt": "x", "params": {"penalty_alpha": 1.5}}, ("penalty_alpha",)),
        ({"prompt": "x", "params": {"do_sample": 1}}, ("do_sample must be true or false, got 1",)),
        ({"prompt": "x", "params": {"top_k": True}}, ("top_k must be an integer",)),
        (
            b'{"prompt": "x", "params": {"max_new_tokens": 1e400}}',
            ("max_new_tokens must be an integer, got inf",),
        ),
        (b'{"prompt": "x", "params": {"temperature": NaN}}', ("temperature must be greater than 0",)),
        (b'{"prompt": "x", "params": {"seed": [1, {"a": null}]}}', ("seed must be an integer",)),
        (b'{"prompt": "\\ud800"}', ("not valid JSON",)),
        ({"prompt": "x", "model": "google/flan-t5-xxl"}, ("not served here", "fake/flan-t5")),
        ({"prompt": []}, ("at least one prompt",)),
        ({"prompt": ["a"] * 65}, ("at most 64 prompts",)),
    ]
    for body, words in cases:
        if isinstance(body, bytes):
            r = await http.post("/v1/submit", content=body, headers=key)
        else:
            r = await http.post("/v1/submit", json=body, headers=key)
        assert_error(r, 422, "invalid_request", *words)
    r = await http.get("/v1/response/abc?wait=-1", headers=key)
    assert_error(r, 422, "invalid_request", "wait must be between 0 and 30 seconds, got -1")
    r = await http.get("/v1/response/abc?wait=soon", headers=key)
    assert_error(r, 422, "invalid_request", "wait must be a number of seconds", "'soon'")


async def test_prompt_too_long_is_413(http: httpx.AsyncClient, stack: FakeStack) -> None:
    r = await http.post("/v1/submit", json={"prompt": ["ok", "y" * 60]}, headers={"apiKey": stack.alice})
    assert_error(r, 413, "prompt_too_long", "prompt 1", "10 over")


async def test_body_size_limit_is_413(http: httpx.AsyncClient, stack: FakeStack) -> None:
    big = b'{"prompt": "' + b"a" * (5 * 1024 * 1024) + b'"}'
    r = await http.post(
        "/v1/submit", content=big, headers={"apiKey": stack.alice, "Content-Type": "application/json"}
    )
    assert_error(r, 413, "payload_too_large", "MiB")


async def test_polling_a_failed_job_answers_an_error_status(
    http: httpx.AsyncClient, stack: FakeStack
) -> None:
    key = {"apiKey": stack.alice}
    r = await http.post("/v1/submit", json={"prompt": "please FAIL"}, headers=key)
    job_id = r.json()["data"]["id"]
    assert_error(await poll(http, job_id, stack.alice), 500, "job_failed", "the job failed", "FAIL")
    r = await http.post("/v1/submit", json={"prompt": "TIMEOUT"}, headers=key)
    assert_error(await poll(http, r.json()["data"]["id"], stack.alice), 504, "timeout")


async def test_cancel_queued_job(http: httpx.AsyncClient, stack: FakeStack) -> None:
    stack.service.pause()
    key = {"apiKey": stack.alice}
    job_id = (await http.post("/v1/submit", json={"prompt": "x"}, headers=key)).json()["data"]["id"]
    r = await http.delete(f"/v1/response/{job_id}", headers=key)
    assert r.status_code == 200
    assert r.json()["data"]["status"] == "cancelled"
    assert r.json()["data"]["completion"] is None
    stack.service.resume()
    r = await http.get(f"/v1/response/{job_id}", headers=key)
    assert r.json()["data"]["status"] == "cancelled"


async def test_long_poll_returns_when_done(http: httpx.AsyncClient, stack: FakeStack) -> None:
    key = {"apiKey": stack.alice}
    job_id = (await http.post("/v1/submit", json={"prompt": "HOLD me"}, headers=key)).json()["data"]["id"]
    r = await http.get(f"/v1/response/{job_id}?wait=0.05", headers=key)
    assert r.json()["data"]["status"] == "running"
    asyncio.get_running_loop().call_later(0.05, stack.service.release)
    r = await http.get(f"/v1/response/{job_id}?wait=10", headers=key)
    assert r.json()["data"]["completion"] == ["HOLD ME"]


async def test_rate_limit_per_key(tmp_path: Path) -> None:
    async with (
        open_stack(str(tmp_path / "k.db"), rate_limit_per_minute=2) as s,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_app(InProcessClient(s.servicer), s.metrics)),
            base_url="http://t",
        ) as http,
    ):
        for _ in range(2):
            r = await http.post("/v1/submit", json={"prompt": "x"}, headers={"apiKey": s.alice})
            assert r.status_code == 200
        r = await http.post("/v1/submit", json={"prompt": "x"}, headers={"apiKey": s.alice})
        assert_error(r, 429, "overloaded", "rate limit of 2 requests per minute")
        assert int(r.headers["Retry-After"]) in (29, 30)
        # Polls do not count; another key has its own budget.
        job_id = (await http.post("/v1/submit", json={"prompt": "x"}, headers={"apiKey": s.bob})).json()[
            "data"
        ]["id"]
        for _ in range(5):
            assert (await http.get(f"/v1/response/{job_id}", headers={"apiKey": s.bob})).status_code == 200


async def test_not_ready(http: httpx.AsyncClient, stack: FakeStack) -> None:
    assert (await http.get("/readyz")).json() == {"status": "ready"}
    stack.service.is_ready = False
    assert_error(await http.get("/readyz"), 503, "not_ready")
    assert_error(
        await http.post("/v1/submit", json={"prompt": "x"}, headers={"apiKey": stack.alice}), 503, "not_ready"
    )
    assert (await http.get("/healthz")).json() == {"status": "ok"}


async def test_unknown_route_and_method_use_the_envelope(http: httpx.AsyncClient) -> None:
    assert_error(await http.get("/v2/nothing"), 404, "not_found", "POST /v1/submit")
    assert_error(await http.put("/v1/submit", json={}), 405, "method_not_allowed")


async def test_internal_errors_never_leak(
    http: httpx.AsyncClient, stack: FakeStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(stack.service, "get", boom)
    r = await http.get("/v1/response/x", headers={"apiKey": stack.alice})
    body = assert_error(r, 500, "internal", "server log")
    assert "secret" not in r.text and "Traceback" not in r.text
    assert body["error"]["message"] == "internal server error; the server log has the details"


async def test_info(http: httpx.AsyncClient) -> None:
    info = (await http.get("/v1/info")).json()
    assert info["model"] == "fake/flan-t5"
    assert info["randomWeights"] is True
    assert info["maxNewTokensLimit"] == 512
    assert info["version"] == __version__  # one version: pyproject reads it, `engine --version` prints it


async def test_metrics_count_requests_by_route_template_and_code(
    http: httpx.AsyncClient, stack: FakeStack
) -> None:
    await http.post("/v1/submit", json={"prompt": "x"}, headers={"apiKey": stack.alice})
    await http.post("/v1/submit", json={"prompt": "x"})
    await http.get("/v1/response/abc", headers={"apiKey": stack.alice})
    await http.get("/no/such/route")
    text = (await http.get("/metrics")).text
    assert 'engine_requests_total{code="200",route="/v1/submit"} 1.0' in text
    assert 'engine_requests_total{code="401",route="/v1/submit"} 1.0' in text
    assert 'engine_requests_total{code="404",route="/v1/response/{job_id}"} 1.0' in text
    assert 'engine_requests_total{code="404",route="unmatched"} 1.0' in text
    assert stack.alice not in text


async def test_openapi_describes_the_real_schemas(http: httpx.AsyncClient) -> None:
    spec = (await http.get("/openapi.json")).json()
    schemas = spec["components"]["schemas"]
    assert {"SubmitBody", "SubmitResponse", "ResponseResponse", "ErrorResponse"} <= set(schemas)
    assert set(schemas["SubmitBody"]["properties"]) == {"prompt", "params", "model"}
    assert schemas["SubmitBody"]["required"] == ["prompt"]
    assert schemas["SubmitData"]["properties"]["queuePosition"]["type"] == "string"
    submit = spec["paths"]["/v1/submit"]["post"]
    assert submit["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "SubmitResponse"
    )
    for code in ("401", "413", "422", "429", "503"):
        assert submit["responses"][code]["content"]["application/json"]["schema"]["$ref"].endswith(
            "ErrorResponse"
        )
    assert {"get", "delete"} <= set(spec["paths"]["/v1/response/{job_id}"])
    params = {p["name"] for p in submit["parameters"]}
    assert "apiKey" in params


WEIRD_VALUES: list[str] = [
    "null",
    "true",
    "false",
    "0",
    "-1",
    "1.5",
    "1e308",
    "-1e400",
    "NaN",
    "Infinity",
    "18446744073709551616",
    '""',
    '"x"',
    '"64"',
    "[]",
    "[1, 2]",
    '["a", null]',
    "{}",
    '{"a": {"b": [1]}}',
    '"' + "z" * 3000 + '"',
]


async def test_no_odd_value_anywhere_gets_a_5xx(tmp_path: Path) -> None:
    """Every field, every parameter, every odd JSON value: an answer in the envelope, never a 5xx."""
    async with open_stack(str(tmp_path / "k.db"), max_queue_size=10**6) as stack:
        stack.service.pause()  # accepted jobs stay queued: this test is about the edge
        app = create_app(InProcessClient(stack.servicer), stack.metrics)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            key = {"apiKey": stack.alice, "Content-Type": "application/json"}
            names = [
                "max_new_tokens",
                "min_new_tokens",
                "top_k",
                "penalty_alpha",
                "num_beams",
                "length_penalty",
                "do_sample",
                "temperature",
                "top_p",
                "seed",
                "repetition_penalty",
                "no_repeat_ngram_size",
                "bogus",
            ]
            bodies = [f'{{"prompt": {v}}}' for v in WEIRD_VALUES]
            bodies += [f'{{"prompt": "x", "model": {v}}}' for v in WEIRD_VALUES]
            bodies += [f'{{"prompt": "x", "params": {v}}}' for v in WEIRD_VALUES]
            bodies += [f'{{"prompt": "x", "params": {{"{n}": {v}}}}}' for n in names for v in WEIRD_VALUES]
            accepted = 0
            for body in bodies:
                r = await http.post("/v1/submit", content=body.encode(), headers=key)
                assert r.status_code < 500, (body[:80], r.text)
                if r.status_code != 200:
                    assert set(r.json()) == {"success", "error"}, r.text
                else:
                    accepted += 1
            assert accepted >= 15  # the valid values went all the way through the service


async def test_public_url_sets_the_response_url(stack: FakeStack) -> None:
    app = create_app(InProcessClient(stack.servicer), stack.metrics, public_url="https://api.example.com/")
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://10.0.0.5:8080"
    ) as http:
        r = await http.post("/v1/submit", json={"prompt": "x"}, headers={"apiKey": stack.alice})
    job_id = r.json()["data"]["id"]
    assert r.json()["data"]["responseUrl"] == f"https://api.example.com/v1/response/{job_id}"


async def test_the_direct_job_routes_answer_exactly_as_the_router_would(
    stack: FakeStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EngineApp sends submit/poll/cancel straight to their handlers; with that switched off the
    same requests go through FastAPI's router and middlewares. Both must answer the same."""
    direct = create_app(InProcessClient(stack.servicer), stack.metrics)
    routed = create_app(InProcessClient(stack.servicer), stack.metrics)
    assert isinstance(routed, EngineApp) and direct.hot is not None
    routed.hot = None
    alice = {"apiKey": stack.alice}
    requests: list[tuple[str, str, dict[str, str], bytes | None]] = [
        ("POST", "/v1/submit", alice, b'{"prompt": "hi", "params": {"max_new_tokens": 4}}'),
        ("POST", "/v1/submit", {"Authorization": f"Bearer {stack.alice}"}, b'{"prompt": ["a", "b"]}'),
        ("POST", "/v1/submit", {}, b'{"prompt": "hi"}'),
        ("POST", "/v1/submit", alice, b'{"prompt": "hi"'),
        ("POST", "/v1/submit", alice, b""),
        ("POST", "/v1/submit", alice, b'{"prompt": "hi", "extra": 1}'),
        ("POST", "/v1/submit", alice, b'{"prompt": "hi", "params": {"top_k": "many"}}'),
        ("POST", "/v1/submit", alice, b'{"prompt": "' + b"x" * 60 + b'"}'),
        ("GET", "/v1/response/nope", alice, None),
        ("GET", "/v1/response/nope?wait=abc", alice, None),
        ("GET", "/v1/response/nope?wait=99", alice, None),
        ("DELETE", "/v1/response/nope", alice, None),
        ("GET", "/v1/response/", alice, None),
        ("GET", "/v1/response/a/b", alice, None),
        ("PUT", "/v1/response/a", alice, None),
        ("POST", "/v1/submit/", alice, b'{"prompt": "hi"}'),
    ]

    async def answers(app: FastAPI) -> list[tuple[int, str, str | None]]:
        out = []
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver:8080") as client:
            for method, url, headers, body in requests:
                r = await client.request(method, url, headers=headers, content=body)
                text = r.text
                if r.status_code == 200 and url == "/v1/submit":
                    data = r.json()["data"]
                    text = text.replace(data["id"], "ID")
                    # the job's own id and place differ between the two runs; the rest must not
                    job = await client.get(f"/v1/response/{data['id']}?wait=5", headers=alice)
                    text += " | " + job.text.replace(data["id"], "ID")
                out.append((r.status_code, text, r.headers.get("retry-after")))
        return out

    assert await answers(direct) == await answers(routed)

    async def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(stack.service, "get", boom)
    for app in (direct, routed):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver:8080") as client:
            r = await client.get("/v1/response/x", headers=alice)
        assert_error(r, 500, "internal", "server log")
        assert "secret" not in r.text
