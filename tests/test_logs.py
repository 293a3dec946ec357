"""Logging: --log-format json writes one JSON object per line, with the job id and the key's name
where known and never the key; --access-log adds one line per HTTP request."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from engine import logs
from engine.config import Config
from engine.errors import InvalidRequest
from harness.processes import create_key_cli, start_server


@pytest.fixture
def captured() -> Iterator[list[logging.LogRecord]]:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    handler.addFilter(logs.ContextFilter())
    logger = logging.getLogger("test.logs")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def test_json_line_has_the_fields_and_the_extra() -> None:
    record = logging.LogRecord("engine.x", logging.WARNING, __file__, 1, "job %s failed", ("j1",), None)
    record.job_id = "j1"
    record.key_name = "alice"
    line = json.loads(logs.JsonFormatter().format(record))
    assert line["level"] == "WARNING" and line["logger"] == "engine.x"
    assert line["message"] == "job j1 failed"
    assert (line["job_id"], line["key_name"]) == ("j1", "alice")
    assert line["ts"].endswith("+00:00")


def test_exceptions_stay_on_one_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record = logging.LogRecord("engine.x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    text = logs.JsonFormatter().format(record)
    assert "\n" not in text
    assert "ValueError: boom" in json.loads(text)["exc"]


def test_bound_context_reaches_records_of_that_context_only(captured: list[logging.LogRecord]) -> None:
    import contextvars

    def in_request() -> None:
        logs.bind(key_name="alice")
        logs.bind(job_id="job-1")
        logging.getLogger("test.logs").info("inside")

    # A server runs each request in a task of its own, i.e. in a copy of the loop's context.
    loop_context = contextvars.Context()
    loop_context.run(lambda: contextvars.copy_context().run(in_request))
    loop_context.run(logging.getLogger("test.logs").info, "outside")
    inside, outside = captured
    assert (getattr(inside, "job_id", None), getattr(inside, "key_name", None)) == ("job-1", "alice")
    assert getattr(outside, "job_id", None) is None and getattr(outside, "key_name", None) is None


def test_text_format_tags_job_and_key() -> None:
    record = logging.LogRecord("engine.x", logging.INFO, __file__, 1, "hello", (), None)
    record.job_id = "j1"
    assert logs.TextFormatter().format(record).endswith("hello [job=j1]")


def test_unknown_format_is_rejected_by_name() -> None:
    with pytest.raises(InvalidRequest, match="log format must be one of text, json"):
        logs.configure("xml")
    with pytest.raises(InvalidRequest, match="log_format must be text or json, got 'xml'"):
        Config.build(environ={"ENGINE_LOG_FORMAT": "xml"})
    assert Config.build(environ={"ENGINE_ACCESS_LOG": "1", "ENGINE_LOG_FORMAT": "json"}).access_log


def _lines(log: str) -> list[dict[str, Any]]:
    out = []
    for line in log.splitlines():
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON line in --log-format json output: {line!r}")
    return out


@pytest.mark.e2e
def test_server_json_log_and_access_log(tmp_path: Path, flan_model_dir: Path) -> None:
    store = f"sqlite:///{tmp_path}/engine.db"
    key = create_key_cli(store, "alice")
    server = start_server(
        ["--model", str(flan_model_dir), "--store", store, "--log-format", "json", "--access-log"],
        tmp_path / "server.log",
    )
    try:
        r = requests.post(
            f"{server.url}/v1/submit",
            headers={"apiKey": key},
            json={"prompt": "hello", "params": {"max_new_tokens": 4}},
            timeout=30,
        )
        job_id = r.json()["data"]["id"]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            data = requests.get(
                f"{server.url}/v1/response/{job_id}?wait=10", headers={"apiKey": key}, timeout=30
            )
            if data.json()["data"]["status"] == "completed":
                break
        assert (
            requests.get(f"{server.url}/v1/response/nope", headers={"apiKey": key}, timeout=30).status_code
            == 404
        )
        assert requests.get(f"{server.url}/healthz", timeout=30).status_code == 200
    finally:
        assert server.stop() == 0, server.log()
    log = server.log()
    assert key not in log
    lines = _lines(log)
    assert any(line["message"].startswith("ready: ") for line in lines)
    access = [line for line in lines if line["logger"] == "engine.access"]
    submit = next(line for line in access if line["path"] == "/v1/submit")
    assert (submit["method"], submit["status"], submit["key_name"], submit["job_id"]) == (
        "POST",
        200,
        "alice",
        job_id,
    )
    assert submit["duration_ms"] >= 0 and submit["client"] == "127.0.0.1"
    poll = next(line for line in access if line["path"] == f"/v1/response/{job_id}")
    assert (poll["status"], poll["key_name"], poll["job_id"]) == (200, "alice", job_id)
    missing = next(line for line in access if line["path"] == "/v1/response/nope")
    assert missing["status"] == 404 and missing["key_name"] == "alice"
    health = next(line for line in access if line["path"] == "/healthz")
    assert "key_name" not in health and "job_id" not in health
