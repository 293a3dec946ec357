"""End to end over real sockets: `engine serve` as a subprocess (a tiny converted model, a temporary
SQLite store, keys made with `engine keys create`), driven with `requests` exactly as the seed's
Python example does, and with a real gRPC client. Outputs are compared with the offline Engine on
the same model folder, to the token."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import requests
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from engine.api.pb import engine_pb2, engine_pb2_grpc
from engine.runtime.engine import Engine
from harness.processes import ServerProcess, create_key_cli, free_port, start_server
from tests.test_api_dashboard import dashboard_exprs, dashboard_metrics

pytestmark = pytest.mark.e2e

CONTRASTIVE = {"max_new_tokens": 16, "top_k": 4, "penalty_alpha": 0.6}


@dataclass
class Env:
    server: ServerProcess
    model_dir: Path
    store_url: str
    alice: str
    bob: str
    carol: str  # for the rate-limit test only
    tmp: Path


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, flan_model_dir: Path) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("e2e")
    store_url = f"sqlite:///{tmp}/engine.db"
    keys = {name: create_key_cli(store_url, name) for name in ("alice", "bob", "carol")}
    server = start_server(
        [
            "--model",
            str(flan_model_dir),
            "--store",
            store_url,
            "--rate-limit-per-minute",
            "40",
            "--max-batch-size",
            "16",
        ],
        tmp / "server.log",
    )
    yield Env(server, flan_model_dir, store_url, keys["alice"], keys["bob"], keys["carol"], tmp)
    code = server.stop()
    assert code == 0, server.log()
    assert "stopped" in server.log()
    for key in keys.values():
        assert key not in server.log()


@pytest.fixture(scope="module")
def offline(env: Env) -> Engine:
    return Engine(env.model_dir)


def seed_example(url: str, key: str, prompt: Any, params: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The seed's Python example, with the URL and key changed (plus a short sleep per poll)."""
    response_step1 = requests.post(
        f"{url}/v1/submit",
        headers={"apiKey": key},
        json={"prompt": prompt, "params": params},
        timeout=30,
    )
    data_step1 = response_step1.json()["data"]
    completed = False
    data_step2: dict[str, Any] = {}
    deadline = time.monotonic() + 60
    while not completed and time.monotonic() < deadline:
        response_step2 = requests.get(data_step1["responseUrl"], headers={"apiKey": key}, timeout=30)
        data_step2 = response_step2.json()["data"]
        completion = data_step2.get("completion")
        completed = completion is not None
        time.sleep(0.01)
    assert completed, data_step2
    return data_step1, data_step2


def test_seed_python_example(env: Env, offline: Engine) -> None:
    prompt = "A step by step recipe to make bolognese pasta:"
    step1, step2 = seed_example(env.server.url, env.alice, prompt, CONTRASTIVE)
    assert step1["queuePosition"] == "0"
    assert step1["responseUrl"] == f"{env.server.url}/v1/response/{step1['id']}"
    expected = offline.generate([prompt], **CONTRASTIVE)[0]
    assert step2["status"] == "completed"
    assert step2["completion"] == [expected.text]
    assert step2["usage"] == expected.usage.to_dict()


def test_prompt_array_and_default_params(env: Env, offline: Engine) -> None:
    prompts = ["Translate to German: good morning", "What is the capital of France?", ""]
    expected = [r.text for r in offline.generate(prompts)]  # defaults: 64 new tokens, greedy
    params: dict[str, Any] | None
    for params in ({}, None):
        _, out = seed_example(env.server.url, env.alice, prompts, params)
        assert out["completion"] == expected
    r = requests.post(
        f"{env.server.url}/v1/submit", headers={"apiKey": env.alice}, json={"prompt": prompts}, timeout=30
    )
    assert r.status_code == 200
    r = requests.get(f"{r.json()['data']['responseUrl']}?wait=30", headers={"apiKey": env.alice}, timeout=60)
    assert r.json()["data"]["completion"] == expected


def test_contrastive_prompts_beyond_the_decoders_rows_all_complete(env: Env, offline: Engine) -> None:
    """32 prompts at top_k 50 need 1,600 decoder rows, the contrastive decoder has 256: the
    prompts join the running batch as rows free up, and every one completes as if run alone."""
    prompts = [f"Question {i}: what comes after {i}?" for i in range(32)]
    params = {"max_new_tokens": 3, "top_k": 50, "penalty_alpha": 0.6}
    r = requests.post(
        f"{env.server.url}/v1/submit",
        headers={"apiKey": env.bob},
        json={"prompt": prompts, "params": params},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    url = f"{r.json()['data']['responseUrl']}?wait=30"
    deadline = time.monotonic() + 120
    while True:
        r = requests.get(url, headers={"apiKey": env.bob}, timeout=60)
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        if data["status"] != "running" and data["status"] != "queued":
            break
        assert time.monotonic() < deadline, data
    assert data["status"] == "completed"
    assert len(data["completion"]) == 32
    for i in (0, 7, 31):  # first, one that had to wait for room, last
        assert data["completion"][i] == offline.generate([prompts[i]], **params)[0].text


def envelope(r: requests.Response, status: int, code: str, *words: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert body == {"success": False, "error": {"code": code, "message": body["error"]["message"]}}
    for w in words:
        assert w in body["error"]["message"], body["error"]["message"]


def test_every_error_in_the_envelope(env: Env) -> None:
    url = f"{env.server.url}/v1/submit"
    a = {"apiKey": env.alice}
    envelope(requests.post(url, json={"prompt": "x"}, timeout=10), 401, "unauthenticated", "apiKey")
    envelope(
        requests.post(url, json={"prompt": "x"}, headers={"apiKey": "ek_00_bad"}, timeout=10),
        401,
        "unauthenticated",
    )
    envelope(
        requests.post(url, json={"prompt": "x"}, headers={"Authorization": "Bearer nope"}, timeout=10),
        401,
        "unauthenticated",
    )
    envelope(
        requests.post(url, data=b'{"prompt": ', headers=a, timeout=10),
        422,
        "invalid_request",
        "not valid JSON",
    )
    envelope(
        requests.post(url, json={"prompt": 42}, headers=a, timeout=10),
        422,
        "invalid_request",
        "prompt must be",
    )
    envelope(
        requests.post(url, json={"prompt": "x", "params": [1]}, headers=a, timeout=10), 422, "invalid_request"
    )
    envelope(
        requests.post(url, json={"prompt": "x", "params": {"temperature": "hot"}}, headers=a, timeout=10),
        422,
        "invalid_request",
        "temperature must be a number",
    )
    envelope(
        requests.post(url, json={"prompt": "x", "params": {"topk": 4}}, headers=a, timeout=10),
        422,
        "invalid_request",
        "unknown parameter(s) topk",
    )
    envelope(
        requests.post(url, json={"prompt": "x", "params": {"max_new_tokens": 513}}, headers=a, timeout=10),
        422,
        "invalid_request",
        "max_new_tokens",
    )
    envelope(requests.post(url, json={"prompt": []}, headers=a, timeout=10), 422, "invalid_request")
    envelope(
        requests.post(url, json={"prompt": "x", "model": "google/flan-t5-xxl"}, headers=a, timeout=10),
        422,
        "invalid_request",
        "not served here",
    )
    long_prompt = " ".join(["word"] * 700)
    envelope(requests.post(url, json={"prompt": long_prompt}, headers=a, timeout=10), 413, "prompt_too_long")
    job = requests.post(
        url, json={"prompt": "x", "params": {"max_new_tokens": 2}}, headers=a, timeout=10
    ).json()
    job_url = job["data"]["responseUrl"]
    envelope(requests.get(job_url, timeout=10), 401, "unauthenticated")
    envelope(requests.get(job_url, headers={"apiKey": env.bob}, timeout=10), 404, "not_found")
    envelope(requests.delete(job_url, headers={"apiKey": env.bob}, timeout=10), 404, "not_found")
    envelope(requests.get(f"{env.server.url}/v1/response/0000", headers=a, timeout=10), 404, "not_found")
    envelope(requests.get(f"{env.server.url}/nowhere", timeout=10), 404, "not_found")
    envelope(requests.get(url, timeout=10), 405, "method_not_allowed")


def test_rate_limit_answers_429_with_retry_after(env: Env) -> None:
    url = f"{env.server.url}/v1/submit"
    body: dict[str, Any] = {"prompt": "x", "params": {"max_new_tokens": 1}}
    codes = [requests.post(url, json=body, headers={"apiKey": env.carol}, timeout=10) for _ in range(41)]
    assert [r.status_code for r in codes[:40]] == [200] * 40
    envelope(codes[40], 429, "overloaded", "rate limit of 40 requests per minute")
    assert 1 <= int(codes[40].headers["Retry-After"]) <= 2


def test_cancel_a_job(env: Env) -> None:
    a = {"apiKey": env.alice}
    long = {"max_new_tokens": 512, "min_new_tokens": 512, "top_k": 8, "penalty_alpha": 0.6}
    r = requests.post(
        f"{env.server.url}/v1/submit", json={"prompt": ["x"] * 8, "params": long}, headers=a, timeout=10
    )
    job_url = r.json()["data"]["responseUrl"]
    r = requests.delete(job_url, headers=a, timeout=10)
    assert r.status_code == 200
    assert r.json()["data"]["status"] == "cancelled"
    assert requests.get(job_url, headers=a, timeout=10).json()["data"]["status"] == "cancelled"


def grpc_request(*prompts: str, **params: Any) -> Any:
    s = struct_pb2.Struct()
    s.update(params)
    return engine_pb2.SubmitRequest(prompts=list(prompts), params=s)


def test_grpc_calls_with_a_real_client(env: Env, offline: Engine) -> None:
    prompts = ["The capital of France is", "List three colors:"]
    expected = offline.generate(prompts, **CONTRASTIVE)
    md = (("apikey", env.alice),)
    with grpc.insecure_channel(env.server.grpc_target) as channel:
        stub = engine_pb2_grpc.EngineStub(channel)
        job = stub.Submit(grpc_request(*prompts, **CONTRASTIVE), metadata=md)
        done = stub.GetResult(engine_pb2.GetResultRequest(id=job.id, wait_s=30), metadata=md)
        assert done.status == engine_pb2.JOB_STATUS_COMPLETED
        assert list(done.result.completion) == [r.text for r in expected]
        assert [tuple(t.ids) for t in done.result.token_ids] == [r.token_ids for r in expected]

        gen = stub.Generate(grpc_request(*prompts, **CONTRASTIVE), metadata=md)
        assert list(gen.result.completion) == [r.text for r in expected]

        messages = list(stub.GenerateStream(grpc_request(*prompts, **CONTRASTIVE), metadata=md))
        assert messages[0].job.status == engine_pb2.JOB_STATUS_QUEUED
        final = messages[-1].job
        assert final.status == engine_pb2.JOB_STATUS_COMPLETED
        tokens = [m.token for m in messages[1:-1]]
        for i, r in enumerate(expected):
            mine = [t for t in tokens if t.prompt_index == i]
            assert tuple(t.token_id for t in mine if t.token_id >= 0) == r.token_ids
            assert "".join(t.text for t in mine) == r.text
            assert mine[-1].finished

        slow = stub.Submit(
            grpc_request("x", max_new_tokens=512, min_new_tokens=512, top_k=8, penalty_alpha=0.6), metadata=md
        )
        cancelled = stub.Cancel(engine_pb2.CancelRequest(id=slow.id), metadata=md)
        assert cancelled.status == engine_pb2.JOB_STATUS_CANCELLED

        with pytest.raises(grpc.RpcError) as info:
            stub.Submit(grpc_request("x", bogus=1), metadata=md)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "unknown parameter(s) bogus" in (info.value.details() or "")
        with pytest.raises(grpc.RpcError) as info:
            stub.GetResult(engine_pb2.GetResultRequest(id=job.id), metadata=(("apikey", env.bob),))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as info:
            stub.Submit(grpc_request("x"))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED

        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(service="engine.v1.Engine"))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = list(
            refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        )
        names = {s.name for s in answers[0].list_services_response.service}
        assert {
            "engine.v1.Engine",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        } <= names


def test_rest_shim_in_front_of_a_remote_grpc_server(env: Env, offline: Engine) -> None:
    shim = start_server(["--grpc-target", env.server.grpc_target], env.tmp / "shim.log")
    try:
        assert requests.get(f"{shim.url}/readyz", timeout=10).json() == {"status": "ready"}
        prompt = "Summarize: the cat sat on the mat."
        step1, step2 = seed_example(shim.url, env.alice, prompt, CONTRASTIVE)
        assert step1["responseUrl"].startswith(shim.url)
        assert step2["completion"] == [offline.generate([prompt], **CONTRASTIVE)[0].text]
        envelope(
            requests.post(f"{shim.url}/v1/submit", json={"prompt": "x"}, timeout=10), 401, "unauthenticated"
        )
        envelope(
            requests.get(step1["responseUrl"], headers={"apiKey": env.bob}, timeout=10), 404, "not_found"
        )
        envelope(
            requests.post(
                f"{shim.url}/v1/submit",
                json={"prompt": " ".join(["w"] * 700)},
                headers={"apiKey": env.alice},
                timeout=10,
            ),
            413,
            "prompt_too_long",
        )
        info = requests.get(f"{shim.url}/v1/info", timeout=10).json()
        assert info["randomWeights"] is True
    finally:
        assert shim.stop() == 0, shim.log()


def test_health_readiness_and_metrics_after_traffic(env: Env) -> None:
    assert requests.get(f"{env.server.url}/healthz", timeout=10).json() == {"status": "ok"}
    assert requests.get(f"{env.server.url}/readyz", timeout=10).json() == {"status": "ready"}
    seed_example(env.server.url, env.alice, "metrics please", {"max_new_tokens": 4})
    with grpc.insecure_channel(env.server.grpc_target) as channel:
        engine_pb2_grpc.EngineStub(channel).Generate(
            grpc_request("x", max_new_tokens=2), metadata=(("apikey", env.alice),)
        )
    r = requests.get(f"{env.server.url}/metrics", timeout=10)
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in (
        "engine_requests_total",
        "engine_queue_depth",
        "engine_jobs_running",
        "engine_queue_wait_seconds_bucket",
        "engine_batch_size_bucket",
        "engine_inference_seconds_bucket",
        "engine_request_latency_seconds_bucket",
        "engine_time_per_output_token_seconds_bucket",
        "engine_generated_tokens_total",
        "engine_prompt_tokens_total",
        "engine_jobs_total",
        "engine_model_info",
        "engine_time_to_first_token_seconds_bucket",
        "engine_prompt_length_tokens_bucket",
        "engine_generation_length_tokens_bucket",
    ):
        assert f"\n{name}" in text, name
    assert 'engine_requests_total{code="200",route="/v1/submit"}' in text
    assert re.search(r'engine_jobs_total\{finish_reason="(eos|stop|length)",status="completed"\}', text)
    assert 'engine_requests_total{code="OK",route="/engine.v1.Engine/Generate"}' in text
    series = {
        line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")
    }
    missing = dashboard_metrics() - series
    assert not missing, f"the dashboard queries series /metrics lacks: {missing}"
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool missing (Debian package prometheus; `make system-deps`)")
    proc = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_failed_job_answers_its_poll_with_an_error_status(env: Env) -> None:
    """A job over --job-timeout-s fails; polling it is an error (504 timeout), never 200 + null."""
    store_url = f"sqlite:///{env.tmp}/timeout.db"
    key = create_key_cli(store_url, "dave")
    server = start_server(
        ["--model", str(env.model_dir), "--store", store_url, "--job-timeout-s", "0.3"],
        env.tmp / "timeout.log",
    )
    try:
        heavy = {"max_new_tokens": 512, "min_new_tokens": 512, "top_k": 50, "penalty_alpha": 0.6}
        r = requests.post(
            f"{server.url}/v1/submit",
            json={"prompt": ["x"] * 5, "params": heavy},
            headers={"apiKey": key},
            timeout=10,
        )
        assert r.status_code == 200, r.text
        job_url = r.json()["data"]["responseUrl"]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            r = requests.get(job_url, headers={"apiKey": key}, timeout=10)
            if r.status_code != 200:
                break
            assert r.json()["data"]["completion"] is None
            time.sleep(0.05)
        envelope(r, 504, "timeout", "job_timeout_s=0.3")
    finally:
        assert server.stop() == 0, server.log()


def test_prometheus_scrapes_the_server_and_answers_every_dashboard_query(env: Env) -> None:
    """A real Prometheus (Debian's) scrapes /metrics; every query of the dashboard parses and the
    latency quantiles have data."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus missing (Debian package prometheus; `make system-deps`)")
    seed_example(env.server.url, env.alice, "scrape me", {"max_new_tokens": 4})
    port = free_port()
    config = env.tmp / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: engine\n    static_configs: [{{targets: ['127.0.0.1:{env.server.http_port}']}}]\n"
    )
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={env.tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    api = f"http://127.0.0.1:{port}/api/v1"
    try:
        deadline = time.monotonic() + 60
        up: list[Any] = []
        while time.monotonic() < deadline:
            try:
                up = requests.get(f"{api}/query", params={"query": "engine_model_info"}, timeout=5).json()[
                    "data"
                ]["result"]
            except (requests.ConnectionError, KeyError):
                up = []
            if up:
                break
            time.sleep(0.5)
        assert up, "Prometheus never scraped the server"
        time.sleep(2.5)  # a few more scrapes so that rate() has two points
        for expr in dashboard_exprs():
            expr = expr.replace("$__rate_interval", "1m")
            r = requests.get(f"{api}/query", params={"query": expr}, timeout=10).json()
            assert r["status"] == "success", (expr, r)
        p50 = "histogram_quantile(0.5, sum by (le) (rate(engine_request_latency_seconds_bucket[1m])))"
        assert requests.get(f"{api}/query", params={"query": p50}, timeout=10).json()["data"]["result"]
    finally:
        proc.terminate()
        proc.wait(10)


def test_serve_with_a_redis_store(env: Env, offline: Engine) -> None:
    """Jobs and keys in Redis (for many machines): `engine keys create --store redis://...`, then the
    seed's flow."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (make system-deps installs it)")
    from harness.processes import redis_server

    with redis_server(env.tmp) as url:
        key = create_key_cli(url, "erin")
        server = start_server(["--model", str(env.model_dir), "--store", url], env.tmp / "redis.log")
        try:
            _, out = seed_example(server.url, key, "Hello from Redis", {"max_new_tokens": 8})
            assert out["completion"] == [offline.generate(["Hello from Redis"], max_new_tokens=8)[0].text]
            envelope(
                requests.get(f"{server.url}/v1/response/nope", headers={"apiKey": env.alice}, timeout=10),
                401,
                "unauthenticated",
            )
        finally:
            assert server.stop() == 0, server.log()


def test_serve_without_a_model_falls_back_to_the_demo_model_loudly(tmp_path: Path) -> None:
    """`make serve` on a machine without a model or the Hub: the random-weight demo model, said
    loudly in the log and in /v1/info (the playground's banner reads it)."""
    server = start_server([], tmp_path / "default.log", timeout_s=600)
    try:
        log = server.log()
        assert "SERVING THE DEMO MODEL: ITS WEIGHTS ARE RANDOM." in log
        assert "DEMO MODEL WITH RANDOM WEIGHTS" in log.split(" ready: ", 1)[1]
        assert "no API keys yet" in log
        info = requests.get(f"{server.url}/v1/info", timeout=10).json()
        assert info["randomWeights"] is True and info["model"] == "flan-t5-small-demo"
        assert (tmp_path / "models" / "flan-t5-small-demo" / "engine.json").is_file()
        assert (tmp_path / "data" / "engine.db").is_file()  # the default store, relative to the cwd
    finally:
        assert server.stop() == 0, server.log()
