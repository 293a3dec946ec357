"""The fault table's rows about the queue, with real `engine serve` processes (issue 11): a flood
from one key across a Redis fleet, the server's queued-token budget, and a submit retried with an
Idempotency-Key after a kill -9. Each test is one row; each stops what it starts."""

from __future__ import annotations

import asyncio
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness.processes import ServerProcess, create_key_cli, redis_server, start_server

pytestmark = pytest.mark.e2e

LONG = {"max_new_tokens": 48, "min_new_tokens": 48}  # every job takes the same, long-ish, time
# A flood job is long enough that two servers running one at a time cannot keep up with the
# submits, even on an idle machine where the tiny test model takes a fraction of a millisecond a
# step: the queue must still hold most of the flood when the quiet key submits.
FLOOD = {"max_new_tokens": 480, "min_new_tokens": 480}


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (make system-deps installs it)")
    with redis_server(tmp_path) as url:
        yield url


def queued(redis_url: str) -> int:
    import redis

    return int(redis.Redis.from_url(redis_url).zcard("engine:jobs:queued"))


def completed_while(redis_url: str, job_id: str) -> int:
    """Jobs completed, on any server, between this job's acceptance and its own completion (the
    store's times: a long poll on the other server notices the end up to a second later)."""
    import redis

    r = redis.Redis.from_url(redis_url)
    created, finished = r.hmget(f"engine:jobs:job:{job_id}", "created_at", "finished_at")
    assert created is not None and finished is not None
    return int(r.zcount("engine:jobs:done:completed", float(created), float(finished))) - 1


async def submit(
    http: httpx.AsyncClient, url: str, key: str, body: dict[str, Any], **headers: str
) -> httpx.Response:
    return await http.post(f"{url}/v1/submit", json=body, headers={"apiKey": key, **headers})


async def wait_done(http: httpx.AsyncClient, url: str, key: str, job_id: str) -> dict[str, Any]:
    while True:
        r = await http.get(f"{url}/v1/response/{job_id}?wait=30", headers={"apiKey": key})
        assert r.status_code == 200, r.text
        data: dict[str, Any] = r.json()["data"]
        if data["status"] in ("completed", "failed", "cancelled"):
            return data


def test_a_flood_on_a_redis_fleet_does_not_make_another_keys_job_wait_behind_it(
    redis_url: str, flan_model_dir: Path, tmp_path: Path
) -> None:
    flood_key, quiet_key = create_key_cli(redis_url, "flood"), create_key_cli(redis_url, "quiet")
    args = [
        "--model",
        str(flan_model_dir),
        "--store",
        redis_url,
        "--max-batch-size",
        "1",
        "--rate-limit-per-minute",
        "0",
    ]
    servers = [start_server(args, tmp_path / f"server{i}.log") for i in (1, 2)]

    async def body() -> None:
        async with httpx.AsyncClient(timeout=60) as http:
            sem = asyncio.Semaphore(16)

            async def one(i: int) -> None:
                async with sem:
                    r = await submit(
                        http, servers[i % 2].url, flood_key, {"prompt": f"flood {i}", "params": FLOOD}
                    )
                    assert r.status_code == 200, r.text

            await asyncio.gather(*(one(i) for i in range(400)))
            ahead = queued(redis_url)  # (its own queuePosition may be 0: its turn can come at once)
            r = await submit(http, servers[1].url, quiet_key, {"prompt": "just one", "params": LONG})
            assert r.status_code == 200, r.text
            assert ahead >= 60, f"the flood must still be queued when the quiet key submits ({ahead} queued)"
            data = await wait_done(http, servers[0].url, quiet_key, r.json()["data"]["id"])
            assert data["status"] == "completed"
            flood_done_meanwhile = completed_while(redis_url, r.json()["data"]["id"])
            # In turn, on both servers: the quiet job went into a next batch. First in, first out
            # would have run the (at least) 60 flood jobs ahead of it first.
            assert flood_done_meanwhile <= 12, f"{flood_done_meanwhile} flood jobs completed before it"

    try:
        asyncio.run(body())
    finally:
        for s in servers:
            s.stop()


def test_the_queued_token_budget_answers_429_and_loses_nothing_accepted(
    flan_model_dir: Path, tmp_path: Path
) -> None:
    store = f"sqlite:///{tmp_path}/engine.db"
    key = create_key_cli(store, "alice")
    server = start_server(
        [
            "--model",
            str(flan_model_dir),
            "--store",
            store,
            "--max-batch-size",
            "1",
            "--max-queued-tokens",
            "200",
            "--rate-limit-per-minute",
            "0",
        ],
        tmp_path / "server.log",
    )

    async def body() -> None:
        async with httpx.AsyncClient(timeout=60) as http:
            accepted, refused = [], []
            for i in range(40):
                r = await submit(
                    http, server.url, key, {"prompt": f"a prompt of several words {i}", "params": LONG}
                )
                if r.status_code == 429:
                    refused.append(r)
                else:
                    assert r.status_code == 200, r.text
                    accepted.append(r.json()["data"]["id"])
            assert refused, "the budget of 200 queued prompt tokens was never reached"
            assert all("max_queued_tokens 200" in r.json()["error"]["message"] for r in refused)
            assert all(int(r.headers["Retry-After"]) >= 1 for r in refused)
            for job_id in accepted:
                assert (await wait_done(http, server.url, key, job_id))["status"] == "completed"

    try:
        asyncio.run(body())
    finally:
        assert server.stop() == 0, server.log()


def test_a_submit_retried_with_its_idempotency_key_after_a_kill_gets_the_same_job(
    flan_model_dir: Path, tmp_path: Path
) -> None:
    store = f"sqlite:///{tmp_path}/engine.db"
    key = create_key_cli(store, "alice")
    args = ["--model", str(flan_model_dir), "--store", store]
    server: ServerProcess = start_server(args, tmp_path / "first.log")
    body = {"prompt": "hello", "params": LONG}

    async def first() -> str:
        async with httpx.AsyncClient(timeout=60) as http:
            r = await submit(http, server.url, key, body, **{"Idempotency-Key": "order-42"})
            assert r.status_code == 200, r.text
            return str(r.json()["data"]["id"])

    async def retry(url: str) -> None:
        async with httpx.AsyncClient(timeout=60) as http:
            r = await submit(http, url, key, body, **{"Idempotency-Key": "order-42"})
            assert r.status_code == 200, r.text
            assert r.json()["data"]["id"] == job_id  # the reply was lost, the job was not
            assert (await wait_done(http, url, key, job_id))["status"] == "completed"
            other = await submit(http, url, key, body, **{"Idempotency-Key": "order-43"})
            assert other.json()["data"]["id"] != job_id

    job_id = asyncio.run(first())
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(timeout=10)
    server = start_server(args, tmp_path / "second.log")
    try:
        asyncio.run(retry(server.url))
    finally:
        assert server.stop() == 0, server.log()
