"""API keys (hashed storage, lookup, revocation), the rate limiter and `engine keys`."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from engine.api.auth import Authenticator, RateLimiter, create_key, digest, split_key
from engine.cli import main
from engine.errors import InvalidRequest, Overloaded, Unauthenticated
from engine.serving.store.keys import SqliteKeyStore, open_key_store


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_keys_are_stored_hashed_and_verified(tmp_path: Path) -> None:
    store = SqliteKeyStore(tmp_path / "e.db")
    key = create_key(store, "alice", now=5.0)
    assert key.startswith("ek_") and len(key) > 50
    raw = (tmp_path / "e.db").read_bytes() + (tmp_path / "e.db-wal").read_bytes()
    assert key.encode() not in raw
    secret = key.split("_", 2)[2]
    assert secret.encode() not in raw
    rows = sqlite3.connect(tmp_path / "e.db").execute("SELECT name, digest FROM api_keys").fetchall()
    assert rows == [("alice", digest(key))]
    auth = Authenticator(store)
    assert auth.authenticate(key) == "alice"
    for bad in (None, "", key + "x", key[:-1], "ek_" + split_key(key) + "_wrong", "Bearer " + key, "x"):  # type: ignore[operator]
        with pytest.raises(Unauthenticated):
            auth.authenticate(bad)
    store.close()


def test_names_are_unique_and_validated(tmp_path: Path) -> None:
    store = SqliteKeyStore(tmp_path / "e.db")
    create_key(store, "alice")
    with pytest.raises(InvalidRequest, match="a key named 'alice' exists; revoke it first"):
        create_key(store, "alice")
    for bad in ("", "a b", "x" * 65, "semi;colon"):
        with pytest.raises(InvalidRequest, match="key name"):
            create_key(store, bad)
    assert [k.name for k in store.list()] == ["alice"]
    store.close()


def test_revoked_key_stops_working_after_the_cache_window(tmp_path: Path) -> None:
    clock = FakeClock()
    store = SqliteKeyStore(tmp_path / "e.db")
    key = create_key(store, "alice")
    auth = Authenticator(store, cache_s=1.0, clock=clock)
    assert auth.authenticate(key) == "alice"
    assert store.remove("alice")
    assert auth.authenticate(key) == "alice"  # cached for up to cache_s
    clock.now += 1.5
    with pytest.raises(Unauthenticated, match="unknown or revoked"):
        auth.authenticate(key)
    store.close()


def test_disabled_auth_owns_everything_as_anonymous() -> None:
    assert Authenticator(None, disabled=True).authenticate(None) == "anonymous"


def test_rate_limiter_token_bucket() -> None:
    clock = FakeClock()
    limiter = RateLimiter(per_minute=3, clock=clock)
    for _ in range(3):
        limiter.acquire("alice")
    with pytest.raises(Overloaded) as info:
        limiter.acquire("alice")
    assert info.value.retry_after_s == pytest.approx(20.0)
    limiter.acquire("bob")  # its own bucket
    clock.now += 20.0
    limiter.acquire("alice")
    with pytest.raises(Overloaded):
        limiter.acquire("alice")
    RateLimiter(per_minute=0, clock=clock).acquire("anyone")  # 0 disables


def test_open_key_store_urls(tmp_path: Path) -> None:
    store = open_key_store(f"sqlite:///{tmp_path}/sub/e.db?synchronous=full")
    assert (tmp_path / "sub" / "e.db").exists()
    store.close()
    for bad in ("sqlite:///", "sqlite://host/x.db", "postgres://x", "e.db"):
        with pytest.raises(InvalidRequest, match="store URL"):
            open_key_store(bad)


def test_keys_cli_create_list_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path}/e.db"
    assert main(["keys", "create", "--name", "alice", "--store", url]) == 0
    out = capsys.readouterr().out
    key = out.strip().splitlines()[-1]
    assert key.startswith("ek_") and " " not in key
    store = SqliteKeyStore(tmp_path / "e.db")
    assert Authenticator(store).authenticate(key) == "alice"
    assert main(["keys", "create", "--name", "alice", "--store", url]) == 2
    assert "a key named 'alice' exists" in capsys.readouterr().err
    assert main(["keys", "list", "--store", url]) == 0
    listing = capsys.readouterr().out
    assert "alice" in listing and key not in listing and split_key(key) in listing  # type: ignore[operator]
    assert main(["keys", "revoke", "alice", "--store", url]) == 0
    assert main(["keys", "revoke", "alice", "--store", url]) == 2
    assert "no key named 'alice'" in capsys.readouterr().err
    assert store.list() == []
    store.close()


def test_keys_create_prints_the_key_alone_on_the_last_line_of_the_command(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine",
            "keys",
            "create",
            "--name",
            "ci",
            "--store",
            f"sqlite:///{tmp_path}/e.db",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ek_")
    assert "shown only once" in proc.stderr


def test_redis_key_store(tmp_path: Path) -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (make system-deps installs it)")
    from harness.processes import redis_server

    with redis_server(tmp_path) as url:
        store = open_key_store(url)
        key = create_key(store, "alice", now=7.0)
        with pytest.raises(InvalidRequest, match="exists"):
            create_key(store, "alice")
        assert [(k.name, k.created_at) for k in store.list()] == [("alice", 7.0)]
        assert store.count() == 1
        auth = Authenticator(store)
        assert auth.authenticate(key) == "alice"
        with pytest.raises(Unauthenticated):
            auth.authenticate(key + "x")
        assert store.remove("alice") and not store.remove("alice")
        with pytest.raises(Unauthenticated):
            Authenticator(store).authenticate(key)
        create_key(store, "alice")  # the name is free again
        store.close()


def test_on_redis_one_rate_limit_bucket_per_key_serves_every_server(redis_url: str | None) -> None:
    if redis_url is None:
        pytest.skip("redis-server is not installed (make system-deps installs it)")
    import uuid

    url = f"{redis_url}?prefix=rl{uuid.uuid4().hex}:"
    a, b = open_key_store(url), open_key_store(url)  # two servers' key stores
    try:
        key = create_key(a, "alice")
        replicas = [Authenticator(s, rate_limit_per_minute=4) for s in (a, b)]
        for i in range(4):  # the bucket holds 4, taken through either server
            auth = replicas[i % 2]
            auth.admit(auth.authenticate(key))
        for auth in replicas:
            with pytest.raises(Overloaded, match="rate limit of 4 requests per minute") as info:
                auth.admit("alice")
            assert 0 < info.value.retry_after_s <= 15
        replicas[0].admit("bob")  # another key: its own bucket
    finally:
        a.close()
        b.close()
