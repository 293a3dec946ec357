"""Store URLs: one parser for every command, every option accepted everywhere, no password shown."""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from engine.errors import InvalidRequest, NotReady
from engine.serving.store.base import open_store
from engine.serving.store.keys import open_key_store
from engine.serving.store.url import parse_store_url, redact, redact_text

SECRET = "s3cr3t-PASSWORD"


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_sqlite_urls_and_options(tmp_path: Path) -> None:
    u = parse_store_url(f"sqlite:///{tmp_path}/e.db?synchronous=FULL&timeout_s=0.25")
    assert (u.is_sqlite, u.path, u.synchronous, u.timeout_s) == (True, f"{tmp_path}/e.db", "full", 0.25)
    assert parse_store_url("sqlite:///./data/engine.db").path == "./data/engine.db"
    assert parse_store_url("sqlite:///:memory:").path == ":memory:"
    for bad, message in (
        ("sqlite://host/x.db", "no host"),
        ("sqlite:///", "names no database file"),
        ("sqlite:///x.db?journal=off", r"unknown option\(s\) journal; known: synchronous, timeout_s"),
        ("sqlite:///x.db?synchronous=off", "synchronous must be normal or full"),
        ("sqlite:///x.db?timeout_s=0", "timeout_s must be a positive number"),
        ("sqlite:///x.db?timeout_s=nan", "timeout_s must be a positive number"),
        ("postgres://x/y", "not supported"),
        ("engine.db", "not supported"),
    ):
        with pytest.raises(InvalidRequest, match=message):
            parse_store_url(bad)


def test_redis_urls_and_options() -> None:
    u = parse_store_url(
        f"redis://:{SECRET}@10.0.0.5:6380/2?prefix=prod:&lease_s=3&timeout_s=0.5&connect_timeout_s=0.2"
    )
    assert u.is_redis and u.prefix == "prod:" and u.jobs_prefix == "prod:jobs:"
    assert (u.lease_s, u.timeout_s, u.connect_timeout_s) == (3.0, 0.5, 0.2)
    assert u.client_url == f"redis://:{SECRET}@10.0.0.5:6380/2"  # our options are not redis-py's
    assert u.redacted.startswith("redis://:***@10.0.0.5:6380/2?")
    assert SECRET not in str(u) and SECRET not in repr(u) and SECRET not in f"{u}"
    d = parse_store_url("redis://localhost")
    assert (d.prefix, d.lease_s, d.client_url) == ("engine:", 30.0, "redis://localhost/0")
    for bad, message in (
        ("redis://h:1/0?ttl=3", r"unknown option\(s\) ttl; known: prefix, lease_s, timeout_s"),
        ("redis://h:1/0?lease_s=-1", "lease_s must be a positive number"),
        ("redis://h:1/0?lease_s=abc", "lease_s must be a positive number"),
        ("redis://h:1/x", "database must be a number"),
        ("redis://h:99999/0", "port must be a number"),
        ("redis:///0", "names no host"),
        ("redis://h:1/0?prefix=", "prefix must not be empty"),
    ):
        with pytest.raises(InvalidRequest, match=message):
            parse_store_url(bad)


def test_errors_about_a_url_never_show_its_password() -> None:
    for bad in (
        f"redis://:{SECRET}@h:1/0?ttl=3",
        f"redis://user:{SECRET}@h:1/0?lease_s=0",
        f"redis://:{SECRET}@h:notaport/0",
        f"redis://:{SECRET}@h:1/x",
    ):
        with pytest.raises(InvalidRequest) as info:
            parse_store_url(bad)
        assert SECRET not in info.value.message and ":***@" in info.value.message
    assert redact(f"redis://user:{SECRET}@h:1/0") == "redis://user:***@h:1/0"
    assert redact("redis://h:1/0") == "redis://h:1/0"
    assert redact_text(f"Error at rediss://:{SECRET}@h:1/0 and redis://u:{SECRET}@x/1") == (
        "Error at rediss://:***@h:1/0 and redis://u:***@x/1"
    )


def test_a_redis_store_that_is_down_fails_fast_without_its_password(caplog: pytest.LogCaptureFixture) -> None:
    url = f"redis://:{SECRET}@127.0.0.1:{closed_port()}/0?lease_s=3&connect_timeout_s=0.2"
    caplog.set_level(logging.DEBUG)
    with pytest.raises(NotReady) as info:
        open_store(url)
    assert SECRET not in info.value.message and "redis://:***@127.0.0.1" in info.value.message
    keys = open_key_store(url)  # lazy: connects on first use
    with pytest.raises(NotReady, match=r"^the key store is unavailable; retry in a moment$"):
        keys.count()
    keys.close()
    assert SECRET not in caplog.text


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine", *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_keys_commands_with_a_down_redis_say_so_without_the_password() -> None:
    url = f"redis://:{SECRET}@127.0.0.1:{closed_port()}/0?lease_s=3"
    for args in (("create", "--name", "a"), ("list",), ("revoke", "a")):
        proc = run_cli("keys", *args, "--store", url)
        assert proc.returncode == 2, proc.stderr
        assert "error: the key store is unavailable" in proc.stderr
        assert SECRET not in proc.stderr + proc.stdout and "Traceback" not in proc.stderr


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_every_url_option_works_for_the_keys_commands_and_keys_share_the_jobs_prefix(tmp_path: Path) -> None:
    import redis

    from harness.processes import redis_server

    with redis_server(tmp_path) as base:
        url = f"{base}?lease_s=3&prefix=tenant1:&timeout_s=0.5&connect_timeout_s=0.5"
        created = run_cli("keys", "create", "--name", "alice", "--store", url)
        assert created.returncode == 0, created.stderr
        key = created.stdout.strip().splitlines()[-1]
        listed = run_cli("keys", "list", "--store", url)
        assert listed.returncode == 0 and "alice" in listed.stdout and key not in listed.stdout
        client = redis.Redis.from_url(base, decode_responses=True)
        try:
            assert sorted(client.keys("*")) == ["tenant1:api_key_names", "tenant1:api_keys"]
            other = run_cli("keys", "list", "--store", base)  # another prefix: another tenant
            assert "no keys" in other.stdout
            store = open_store(url)
            store.close()
            assert all(str(k).startswith("tenant1:") for k in client.keys("*"))
        finally:
            client.close()
        revoked = run_cli("keys", "revoke", "alice", "--store", url)
        assert revoked.returncode == 0, revoked.stderr
