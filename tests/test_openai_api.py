"""The OpenAI-compatible routes and the seed's token stream, end to end: `engine serve` as a
subprocess (the tiny converted test model, a temporary SQLite store, keys made with `engine keys
create`), driven with the official `openai` package (sync and async, streaming and not) and with
httpx for the seed's `GET /v1/response/{id}/stream`. Texts are compared with the offline Engine on
the same model folder."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from engine.api.openai_protocol import chat_prompt, decoding_params
from engine.runtime.engine import Engine
from harness.processes import ServerProcess, create_key_cli, start_server

pytestmark = pytest.mark.e2e

GREEDY: dict[str, Any] = {}
CONTRASTIVE: dict[str, Any] = {"top_k": 4, "penalty_alpha": 0.6}
PROMPTS = [
    "Translate to German: good morning",
    "What is the capital of France? Answer in one word, please.",
    "Ünïcödé ✓ 東京 — résumé naïve café",
    "",
]


@dataclass
class Env:
    server: ServerProcess
    model_dir: Path
    alice: str
    bob: str


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, flan_model_dir: Path) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("openai")
    store_url = f"sqlite:///{tmp}/engine.db"
    alice, bob = (create_key_cli(store_url, name) for name in ("alice", "bob"))
    server = start_server(
        ["--model", str(flan_model_dir), "--store", store_url, "--rate-limit-per-minute", "1000"],
        tmp / "server.log",
    )
    yield Env(server, flan_model_dir, alice, bob)
    assert server.stop() == 0, server.log()
    assert alice not in server.log()


@pytest.fixture(scope="module")
def offline(env: Env) -> Engine:
    return Engine(env.model_dir)


def client(env: Env, key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{env.server.url}/v1", api_key=key or env.alice, max_retries=0, timeout=60)


def metric(env: Env, name: str, **labels: str) -> float:
    text = httpx.get(f"{env.server.url}/metrics", timeout=10).text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{name}(?:\{{([^}}]*)\}})? (\S+)$", line)
        if m and all(part in (m.group(1) or "") for part in want.split(",") if part):
            total += float(m.group(2))
    return total


# ---- completions ----------------------------------------------------------------------------


def test_models_lists_the_served_model(env: Env) -> None:
    with client(env) as c:
        models = c.models.list()
    assert [m.id for m in models.data] == [env.model_dir.name]
    assert models.data[0].model_dump()["root"] == "test:flan:seed=0"  # engine.json's source


def test_completion_equals_the_offline_engine(env: Env, offline: Engine) -> None:
    with client(env) as c:
        out = c.completions.create(model=env.model_dir.name, prompt=PROMPTS, max_tokens=12, user="u1")
    expected = offline.generate(PROMPTS, max_new_tokens=12)
    assert out.object == "text_completion" and out.id.startswith("cmpl-")
    assert [c.index for c in out.choices] == list(range(len(PROMPTS)))
    assert [c.text for c in out.choices] == [r.text for r in expected]
    assert [c.finish_reason for c in out.choices] == [
        "length" if r.finish_reason.value == "length" else "stop" for r in expected
    ]
    assert out.usage is not None
    assert out.usage.prompt_tokens == sum(r.usage.prompt_tokens for r in expected)
    assert out.usage.completion_tokens == sum(r.usage.completion_tokens for r in expected)
    assert out.model == env.model_dir.name


def test_default_max_tokens_is_16_and_n_repeats_each_prompt(env: Env, offline: Engine) -> None:
    with client(env) as c:
        out = c.completions.create(model="", prompt=["one", "two"], n=2)
    expected = offline.generate(["one", "two"], max_new_tokens=16)
    assert [c.text for c in out.choices] == [expected[0].text] * 2 + [expected[1].text] * 2
    assert out.usage is not None
    assert out.usage.prompt_tokens == sum(r.usage.prompt_tokens for r in expected)  # each prompt once
    assert out.usage.completion_tokens == 2 * sum(r.usage.completion_tokens for r in expected)


STREAM_STRATEGIES = {
    "greedy": GREEDY,
    "contrastive": CONTRASTIVE,
    "beam": {"num_beams": 3},
    "seeded sampling": {"temperature": 0.8, "seed": 7},
}


@pytest.mark.parametrize("extra", list(STREAM_STRATEGIES.values()), ids=list(STREAM_STRATEGIES))
def test_streamed_deltas_add_up_to_the_non_streamed_text(
    env: Env, offline: Engine, extra: dict[str, Any]
) -> None:
    with client(env) as c:
        streamed_and_plain(c, extra, offline)


def streamed_and_plain(c: openai.OpenAI, extra: dict[str, Any], offline: Engine) -> None:
    plain = c.completions.create(model="", prompt=PROMPTS, max_tokens=24, extra_body=extra)
    texts = [""] * len(PROMPTS)
    reasons: list[str | None] = [None] * len(PROMPTS)
    usage = None
    chunks = 0
    stream = c.completions.create(
        model="",
        prompt=PROMPTS,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=extra,
    )
    for chunk in stream:
        chunks += 1
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            texts[ch.index] += ch.text
            if ch.finish_reason is not None:
                reasons[ch.index] = ch.finish_reason
    assert texts == [ch.text for ch in plain.choices]
    assert reasons == [ch.finish_reason for ch in plain.choices]
    assert usage is not None and plain.usage is not None
    assert usage.model_dump() == plain.usage.model_dump()
    assert chunks > len(PROMPTS) + 1  # token by token, not one chunk per prompt
    params = decoding_params(extra, 24, 16)  # the job's params, as the route maps them
    assert texts == [r.text for r in offline.generate(PROMPTS, **params)]


# ---- chat -----------------------------------------------------------------------------------

MESSAGES: list[Any] = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Hello there"},
    {"role": "assistant", "content": "Hi!"},
    {"role": "user", "content": [{"type": "text", "text": "Name a colour."}]},
]


def test_chat_prompt_format_is_fixed() -> None:
    assert chat_prompt(MESSAGES) == (
        "You answer briefly.\nuser: Hello there\nassistant: Hi!\nuser: Name a colour.\nassistant:"
    )


def test_chat_completion_and_its_stream(env: Env, offline: Engine) -> None:
    with client(env) as c:
        chat_and_stream(c, offline)


def chat_and_stream(c: openai.OpenAI, offline: Engine) -> None:
    out = c.chat.completions.create(model="", messages=MESSAGES, max_tokens=10)
    expected = offline.generate([chat_prompt(MESSAGES)], max_new_tokens=10)[0]
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == expected.text
    assert out.usage is not None and out.usage.prompt_tokens == expected.usage.prompt_tokens
    stream = c.chat.completions.create(model="", messages=MESSAGES, max_tokens=10, stream=True)
    first = None
    content = ""
    reason = None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        delta = chunk.choices[0].delta
        if first is None:
            first = delta
        content += delta.content or ""
        reason = chunk.choices[0].finish_reason or reason
    assert first is not None and first.role == "assistant"
    assert content == expected.text
    assert reason == out.choices[0].finish_reason


def test_async_client_streams_and_waits(env: Env, offline: Engine) -> None:
    async def body() -> None:
        c = openai.AsyncOpenAI(base_url=f"{env.server.url}/v1", api_key=env.bob, max_retries=0)
        plain, stream = await asyncio.gather(
            c.chat.completions.create(model="", messages=MESSAGES, max_tokens=8, extra_body=CONTRASTIVE),
            c.chat.completions.create(
                model="", messages=MESSAGES, max_tokens=8, stream=True, extra_body=CONTRASTIVE
            ),
        )
        content = ""
        async for chunk in stream:
            content += chunk.choices[0].delta.content or "" if chunk.choices else ""
        assert content == plain.choices[0].message.content
        await c.close()

    asyncio.run(body())


# ---- errors ---------------------------------------------------------------------------------


def test_errors_are_openais(env: Env) -> None:
    with client(env, "ek_00_bad") as bad_key, pytest.raises(openai.AuthenticationError) as auth:
        bad_key.completions.create(model="", prompt="x")
    assert auth.value.status_code == 401
    assert auth.value.body["type"] == "authentication_error"  # type: ignore[index]
    with client(env) as c:
        bad_requests(c)
    r = httpx.post(
        f"{env.server.url}/v1/completions", content=b"{", headers={"apiKey": env.alice}, timeout=10
    )
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def bad_requests(c: openai.OpenAI) -> None:
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"logprobs": 6}, "logprobs", "logprobs must be between 0 and 5"),
        ({"logprobs": 1, "extra_body": {"num_beams": 2}}, "logprobs", "num_beams"),
        ({"max_tokens": 0}, "max_tokens", "max_tokens must be between 1"),
        ({"extra_body": {"frobnicate": 1}}, "frobnicate", "unknown field"),
        ({"temperature": -1}, "temperature", "at least 0"),
        ({"top_p": 0.5}, "top_p", "temperature > 0"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
        ({"presence_penalty": 0.5}, "presence_penalty", "repetition_penalty"),
    ]
    for kwargs, param, words in cases:
        args: dict[str, Any] = {"model": "", "prompt": "x", **kwargs}
        with pytest.raises(openai.BadRequestError) as bad:
            c.completions.create(**args)
        err = bad.value.body
        assert isinstance(err, dict), err
        assert bad.value.status_code == 400 and err["type"] == "invalid_request_error", err
        assert err["param"] == param, err
        assert words in err["message"], err
    with pytest.raises(openai.NotFoundError) as missing:
        c.completions.create(model="gpt-4", prompt="x")
    body: Any = missing.value.body
    assert body == {
        "message": body["message"],
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }
    assert "not served" in body["message"]
    with pytest.raises(openai.BadRequestError) as bad:
        tool_turn: Any = [{"role": "tool", "content": "x"}]
        c.chat.completions.create(model="", messages=tool_turn)
    assert "role must be one of" in str(bad.value.body)


def test_rate_limit_answers_429_with_retry_after(tmp_path: Path, flan_model_dir: Path) -> None:
    store_url = f"sqlite:///{tmp_path}/engine.db"
    key = create_key_cli(store_url, "solo")
    server = start_server(
        ["--model", str(flan_model_dir), "--store", store_url, "--rate-limit-per-minute", "2"],
        tmp_path / "server.log",
    )
    try:
        with (
            openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0) as c,
            pytest.raises(openai.RateLimitError) as limited,
        ):
            for _ in range(4):
                c.completions.create(model="", prompt="x", max_tokens=1)
        assert limited.value.response.headers["retry-after"].isdigit()
        assert limited.value.body["type"] == "rate_limit_error"  # type: ignore[index]
    finally:
        assert server.stop() == 0


# ---- disconnects ----------------------------------------------------------------------------


def test_a_client_that_goes_away_cancels_its_job(env: Env) -> None:
    before = metric(env, "engine_jobs_total", status="cancelled")
    # Contrastive over 16 candidates, 16 x 512 tokens: seconds of work on the test model (4 x 512
    # over 8 took under 0.5 s once the kernel got faster).
    body = {"prompt": "long " * 20, "max_tokens": 512, "min_tokens": 512, "n": 16, **CONTRASTIVE, "top_k": 16}
    headers = {"Authorization": f"Bearer {env.bob}"}
    with (
        httpx.Client(timeout=60) as h,
        h.stream(
            "POST", f"{env.server.url}/v1/completions", json={**body, "stream": True}, headers=headers
        ) as r,
    ):
        assert r.status_code == 200
        next(r.iter_lines())  # the first token arrived: the job runs; now hang up
    with pytest.raises(httpx.ReadTimeout):  # non-streaming: the client gives up waiting
        httpx.post(f"{env.server.url}/v1/completions", json=body, headers=headers, timeout=0.5)
    deadline = time.monotonic() + 30
    while metric(env, "engine_jobs_total", status="cancelled") < before + 2:
        assert time.monotonic() < deadline, "the abandoned jobs were not cancelled"
        time.sleep(0.1)


# ---- the seed's stream ----------------------------------------------------------------------


def sse_events(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    event: dict[str, Any] = {}
    for line in lines:
        if not line:
            if event:
                yield event
            event = {}
            continue
        name, _, value = line.partition(": ")
        event[name] = json.loads(value) if name == "data" else value


def submit(env: Env, prompts: list[str], params: dict[str, Any], key: str | None = None) -> str:
    r = httpx.post(
        f"{env.server.url}/v1/submit",
        json={"prompt": prompts, "params": params},
        headers={"apiKey": key or env.alice},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    return str(r.json()["data"]["id"])


def busy(env: Env) -> None:
    """Seconds of other work ahead of the next job, so that a stream opened next is open before
    that job's first token (a finished job streams its done event alone). Its 16 x 16 candidate
    rows fill our decoder's batch (256 rows), so the next job of the continuous lane (greedy and
    contrastive here) waits for room."""
    params = {"max_new_tokens": 512, "min_new_tokens": 512, **CONTRASTIVE, "top_k": 16}
    submit(env, ["busy"] * 16, params, key=env.bob)


def stream_job(env: Env, job_id: str, last_event_id: int | None = None) -> list[dict[str, Any]]:
    headers = {"apiKey": env.alice}
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    with httpx.stream(
        "GET", f"{env.server.url}/v1/response/{job_id}/stream", headers=headers, timeout=60
    ) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return list(sse_events(r.iter_lines()))


@pytest.mark.parametrize("params", [{"max_new_tokens": 40}, {"max_new_tokens": 40, **CONTRASTIVE}])
def test_seed_stream_token_by_token_then_done(env: Env, params: dict[str, Any]) -> None:
    busy(env)
    job_id = submit(env, PROMPTS, {**params, "min_new_tokens": 30})
    events = stream_job(env, job_id)
    done = events[-1]
    assert done["event"] == "done" and done["data"]["status"] == "completed"
    tokens = events[:-1]
    assert [int(e["id"]) for e in tokens] == list(range(1, len(tokens) + 1))
    for i, completion in enumerate(done["data"]["completion"]):
        mine = [e["data"] for e in tokens if e["data"]["prompt"] == i]
        assert "".join(e["text"] for e in mine) == completion
        ids = [e["token_id"] for e in mine if e["token_id"] >= 0]
        assert ids == done["data"]["tokenIds"][i]
    # Resumed after event 5: the same events from 6 on (the job is still held by the server:
    # a finished one answers with done alone).
    finished = stream_job(env, job_id, last_event_id=5)
    assert [e["event"] for e in finished] == ["done"]
    assert finished[0]["data"] == done["data"]


def test_seed_stream_resumes_after_last_event_id_while_running(env: Env) -> None:
    long = {"max_new_tokens": 400, "min_new_tokens": 400, **CONTRASTIVE, "top_k": 8}  # about a second
    job_id = submit(env, ["resume me"], long)
    headers = {"apiKey": env.alice}
    first: list[dict[str, Any]] = []
    with httpx.stream(
        "GET", f"{env.server.url}/v1/response/{job_id}/stream", headers=headers, timeout=60
    ) as r:
        for ev in sse_events(r.iter_lines()):
            first.append(ev)
            if len(first) == 3:
                break
    rest = stream_job(env, job_id, last_event_id=3)
    assert rest[-1]["event"] == "done"
    assert len(first) == 3 and len(rest) > 1, (first, rest[:2])
    assert int(rest[0]["id"]) == 4, rest[:2]  # still running: the stream resumed at event 4
    streamed = "".join(e["data"]["text"] for e in [*first, *rest[:-1]])
    assert streamed == rest[-1]["data"]["completion"][0]


def test_seed_poll_reply_has_finish_reasons_and_token_ids(env: Env, offline: Engine) -> None:
    job_id = submit(env, PROMPTS[:2], {"max_new_tokens": 5})
    r = httpx.get(f"{env.server.url}/v1/response/{job_id}?wait=30", headers={"apiKey": env.alice}, timeout=60)
    data = r.json()["data"]
    expected = offline.generate(PROMPTS[:2], max_new_tokens=5)
    assert data["tokenIds"] == [list(e.token_ids) for e in expected]
    assert data["finishReason"] == [e.finish_reason.value for e in expected]


def test_seed_stream_errors_keep_the_envelope(env: Env) -> None:
    r = httpx.get(f"{env.server.url}/v1/response/nope/stream", headers={"apiKey": env.alice}, timeout=10)
    assert r.status_code == 404 and r.json()["success"] is False
    r = httpx.get(f"{env.server.url}/v1/response/nope/stream", timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthenticated"


# ---- stop sequences, every strategy ---------------------------------------------------------

STOP_STRATEGIES: dict[str, dict[str, Any]] = {
    "greedy": {},
    "beam": {"num_beams": 3},
    # top_k 1 makes CTranslate2's sampling repeatable, so the unstopped run is its reference.
    "sampling": {"temperature": 1.0, "top_k": 1},
    "contrastive": CONTRASTIVE,
    "seeded sampling": {"temperature": 0.8, "seed": 7},
}
STOP_PROMPTS = ["ka bo zu pe mi lo", "tifudo kebupi ro vu se da", "ga no ka bo"]


def stop_inside(text: str) -> str:
    """Three characters from the middle of ``text``: a match well before its end."""
    middle = text[: len(text) // 2].rstrip()
    assert len(middle) >= 4, text
    return middle[-4:-1]


@pytest.mark.parametrize("strategy", list(STOP_STRATEGIES))
def test_stop_sequences_cut_the_text_in_every_strategy(env: Env, offline: Engine, strategy: str) -> None:
    extra = {**STOP_STRATEGIES[strategy], "min_tokens": 24}
    params = decoding_params(extra, 24, 16)  # the job's params, as the route maps them
    full = [offline.generate([p], **params)[0].text for p in STOP_PROMPTS]  # one job each, as sent
    with client(env) as c:
        for prompt, text in zip(STOP_PROMPTS, full, strict=True):
            stop = [stop_inside(text), "\u2603never\u2603"]
            want = text[: text.find(stop[0])]
            out = c.completions.create(model="", prompt=prompt, max_tokens=24, stop=stop, extra_body=extra)
            assert out.choices[0].text == want and out.choices[0].finish_reason == "stop", (text, stop)
            streamed = ""
            reason = None
            for chunk in c.completions.create(
                model="", prompt=prompt, max_tokens=24, stop=stop, stream=True, extra_body=extra
            ):
                streamed += chunk.choices[0].text
                reason = chunk.choices[0].finish_reason or reason
            assert streamed == want and reason == "stop"


def test_seed_params_stop_and_its_stream(env: Env, offline: Engine) -> None:
    text = offline.generate(STOP_PROMPTS[:1], max_new_tokens=24, min_new_tokens=24)[0].text
    stop = stop_inside(text)
    busy(env)
    job_id = submit(env, STOP_PROMPTS[:1], {"max_new_tokens": 24, "min_new_tokens": 24, "stop": stop})
    events = stream_job(env, job_id)
    done = events[-1]["data"]
    assert done["completion"] == [text[: text.find(stop)]]
    assert done["finishReason"] == ["stop"]
    assert "".join(e["data"]["text"] for e in events[:-1]) == done["completion"][0]


# ---- logprobs -------------------------------------------------------------------------------
LOGPROB_PROMPTS = PROMPTS[:3]


def idle(env: Env) -> None:
    """Wait for the server's jobs to end (``busy``'s, and the hung-up clients'). The logprobs below
    are compared with the offline engine's to the last bit, which holds when the request has our
    decoder's batch to itself, as offline: rows that share a step can change a float's rounding
    (float32 products of more than 32 rows go to OpenBLAS, whose blocking depends on the rows)."""
    deadline = time.monotonic() + 60
    while metric(env, "engine_jobs_running") or metric(env, "engine_queue_depth"):
        assert time.monotonic() < deadline, "the server's earlier jobs did not end within 60 s"
        time.sleep(0.05)


def expected_completion_logprobs(offline: Engine, result: Any) -> dict[str, Any]:
    tok = offline.tokenizer
    ids = list(result.token_ids)
    return {
        "tokens": [tok.piece(i) for i in ids],
        "token_logprobs": [t.logprob for t in result.logprobs],
        "top_logprobs": [{tok.piece(i): v for i, v in t.top} for t in result.logprobs],
        "text_offset": [min(len(tok.decode(ids[:k])), len(result.text)) for k in range(len(ids))],
    }


@pytest.mark.parametrize("extra", [GREEDY, CONTRASTIVE], ids=["greedy", "contrastive"])
def test_completion_logprobs_streamed_and_not(env: Env, offline: Engine, extra: dict[str, Any]) -> None:
    idle(env)
    with client(env) as c:
        out = c.completions.create(
            model="", prompt=LOGPROB_PROMPTS, max_tokens=10, logprobs=2, extra_body=extra
        )
        stream = c.completions.create(
            model="", prompt=LOGPROB_PROMPTS, max_tokens=10, logprobs=2, extra_body=extra, stream=True
        )
        streamed: list[dict[str, list[Any]]] = [
            {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
            for _ in LOGPROB_PROMPTS
        ]
        texts = [""] * len(LOGPROB_PROMPTS)
        for chunk in stream:
            for ch in chunk.choices:
                texts[ch.index] += ch.text
                if ch.logprobs is not None:
                    for name, values in streamed[ch.index].items():
                        values.extend(getattr(ch.logprobs, name))
    expected = offline.generate(LOGPROB_PROMPTS, max_new_tokens=10, logprobs=2, **extra)
    for i, (ch, r) in enumerate(zip(out.choices, expected, strict=True)):
        want = expected_completion_logprobs(offline, r)
        assert ch.text == r.text == texts[i]
        assert ch.logprobs is not None
        got = ch.logprobs.model_dump()
        assert got == want  # the engine's float64 figures, exactly, through gRPC and JSON
        assert all(v <= 0 for v in got["token_logprobs"]) and len(got["tokens"]) == r.usage.completion_tokens
        assert all(len(top) == 2 for top in got["top_logprobs"])
        assert streamed[i] == want


def test_chat_logprobs_streamed_and_not(env: Env, offline: Engine) -> None:
    idle(env)
    with client(env) as c:
        out = c.chat.completions.create(
            model="", messages=MESSAGES, max_tokens=10, logprobs=True, top_logprobs=3
        )
        stream = c.chat.completions.create(
            model="", messages=MESSAGES, max_tokens=10, logprobs=True, top_logprobs=3, stream=True
        )
        streamed: list[Any] = []
        for chunk in stream:
            lp = chunk.choices[0].logprobs
            if lp is not None and lp.content:
                streamed.extend(e.model_dump() for e in lp.content)
        plain = c.chat.completions.create(model="", messages=MESSAGES, max_tokens=10)
        with pytest.raises(openai.BadRequestError) as bad:
            c.chat.completions.create(model="", messages=MESSAGES, top_logprobs=2)
    assert bad.value.status_code == 400 and "logprobs: true" in str(bad.value.body)
    assert plain.choices[0].logprobs is None
    r = offline.generate([chat_prompt(MESSAGES)], max_new_tokens=10, logprobs=3)[0]
    assert r.logprobs is not None
    tok = offline.tokenizer

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        piece = tok.piece(token_id)
        return {"token": piece, "logprob": logprob, "bytes": list(piece.replace("▁", " ").encode())}

    want = [
        {**entry(t.token_id, t.logprob), "top_logprobs": [entry(i, v) for i, v in t.top]} for t in r.logprobs
    ]
    assert out.choices[0].message.content == r.text
    assert out.choices[0].logprobs is not None and out.choices[0].logprobs.content is not None
    assert [e.model_dump() for e in out.choices[0].logprobs.content] == want
    assert streamed == want
    for e in want:  # greedy: the chosen token is the most likely one
        assert e["logprob"] <= 0 and e["top_logprobs"][0]["token"] == e["token"]


def test_seed_poll_reply_has_logprobs_when_asked(env: Env, offline: Engine) -> None:
    idle(env)
    params = {"max_new_tokens": 6, "logprobs": 1, "stop": "zz"}
    job_id = submit(env, PROMPTS[:2], params)
    r = httpx.get(f"{env.server.url}/v1/response/{job_id}?wait=30", headers={"apiKey": env.alice}, timeout=60)
    data = r.json()["data"]
    expected = offline.generate(PROMPTS[:2], **params)
    want = []
    for e in expected:
        lp = expected_completion_logprobs(offline, e)
        assert e.logprobs is not None
        want.append(
            [
                {
                    "tokenId": t.token_id,
                    "token": lp["tokens"][k],
                    "logprob": t.logprob,
                    "textOffset": lp["text_offset"][k],
                    "top": [
                        {"tokenId": i, "token": offline.tokenizer.piece(i), "logprob": v} for i, v in t.top
                    ],
                }
                for k, t in enumerate(e.logprobs)
            ]
        )
    assert data["logprobs"] == want
    plain = submit(env, PROMPTS[:1], {"max_new_tokens": 2})
    r = httpx.get(f"{env.server.url}/v1/response/{plain}?wait=30", headers={"apiKey": env.alice}, timeout=60)
    assert "logprobs" not in r.json()["data"]
