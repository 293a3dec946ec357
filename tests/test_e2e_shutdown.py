"""Shutdown semantics over real sockets (issue 11 item 9): `engine serve` as a subprocess, SIGTERM
while a unary Generate, a GenerateStream, a REST long poll and the seed's event stream wait for
jobs that cannot finish before the server stops. None may answer as if they had: gRPC UNAVAILABLE
and REST 503 with a retry-after, the event stream ends without its done event; the client
retries, the jobs stay queued and complete on the next start."""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import grpc
import pytest
import requests

from engine.api.pb import engine_pb2, engine_pb2_grpc
from harness.processes import create_key_cli, start_server

pytestmark = pytest.mark.e2e


def in_thread(fn: Any) -> Future[Any]:
    fut: Future[Any] = Future()

    def run() -> None:
        try:
            fut.set_result(fn())
        except BaseException as exc:
            fut.set_exception(exc)

    threading.Thread(target=run, daemon=True).start()
    return fut


def test_sigterm_answers_waiting_generate_and_long_poll_with_unavailable(
    tmp_path: Path, flan_model_dir: Path
) -> None:
    store_url = f"sqlite:///{tmp_path}/engine.db"
    key = create_key_cli(store_url, "alice")
    common = ["--model", str(flan_model_dir), "--store", store_url, "--job-timeout-s", "120"]
    # A lone job waits a minute for company before it runs (on the batch lane: greedy would
    # otherwise start at once on the continuous one): the jobs below are still queued when the
    # server is told to stop.
    server = start_server(
        [*common, "--max-queue-delay-ms", "60000", "--greedy-lane", "batch"], tmp_path / "first.log"
    )
    try:
        headers = {"apiKey": key}
        r = requests.post(
            f"{server.url}/v1/submit", json={"prompt": "hello there"}, headers=headers, timeout=10
        )
        assert r.status_code == 200, r.text
        polled_id = r.json()["data"]["id"]
        long_poll = in_thread(
            lambda: requests.get(f"{server.url}/v1/response/{polled_id}?wait=25", headers=headers, timeout=60)
        )

        stream = in_thread(
            lambda: requests.get(f"{server.url}/v1/response/{polled_id}/stream", headers=headers, timeout=60)
        )

        channel = grpc.insecure_channel(server.grpc_target)
        stub = engine_pb2_grpc.EngineStub(channel)
        generate = in_thread(
            lambda: stub.Generate(
                engine_pb2.SubmitRequest(prompts=["good morning"]), metadata=(("apikey", key),), timeout=60
            )
        )
        streamed = in_thread(
            lambda: list(
                stub.GenerateStream(
                    engine_pb2.SubmitRequest(prompts=["good evening"]),
                    metadata=(("apikey", key),),
                    timeout=60,
                )
            )
        )
        time.sleep(1.5)  # all of them are waiting now
        assert not long_poll.done(), long_poll.result().text
        assert not generate.done(), generate.exception()
        assert not stream.done(), stream.result().text
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)

        with pytest.raises(grpc.RpcError) as info:
            generate.result(timeout=30)
        err: Any = info.value
        assert err.code() == grpc.StatusCode.UNAVAILABLE, (err.code(), err.details())
        assert "has not finished" in err.details() and "retry" in err.details()
        trailers = dict(err.trailing_metadata() or ())
        assert trailers.get("error-code") == "not_ready" and trailers.get("retry-after") == "1"

        with pytest.raises(grpc.RpcError) as info:
            streamed.result(timeout=30)
        err = info.value
        assert err.code() == grpc.StatusCode.UNAVAILABLE, (err.code(), err.details())

        reply = long_poll.result(timeout=30)
        assert reply.status_code == 503, reply.text
        assert reply.headers["Retry-After"] == "1"
        body = reply.json()
        assert body["success"] is False and body["error"]["code"] == "not_ready"
        assert polled_id in body["error"]["message"]
        # The seed's event stream ends without a done event (the job is not over) and tells an
        # EventSource when to reconnect (with Last-Event-ID, to this job on the next server).
        events = stream.result(timeout=30).text
        assert "event: done" not in events and events.endswith("retry: 1000\n\n"), events
        assert time.monotonic() - started < 20  # answered at the drain's end, not at a timeout
        channel.close()
        assert server.proc.wait(60) == 0, server.log()
    finally:
        server.stop()

    # The jobs were kept: the next server runs them, and the client's retry finds the result.
    server = start_server(common, tmp_path / "second.log")
    try:
        deadline = time.monotonic() + 60
        while True:
            r = requests.get(f"{server.url}/v1/response/{polled_id}?wait=5", headers=headers, timeout=30)
            assert r.status_code == 200, r.text
            if r.json()["data"]["status"] == "completed" or time.monotonic() > deadline:
                break
        assert r.json()["data"]["status"] == "completed", r.text
        assert len(r.json()["data"]["completion"]) == 1
    finally:
        assert server.stop() == 0, server.log()
