"""API key stores, beside the job stores: the same URL opens both (engine.serving.store.url).

A ``sqlite:///`` URL keeps keys in an ``api_keys`` table of the job database file; a ``redis://``
URL in the hashes ``<prefix>api_keys`` (id -> record) and ``<prefix>api_key_names`` (name -> id),
under the same prefix as the jobs (``<prefix>jobs:``), and there the rate-limit buckets too
(``<prefix>ratelimit:<owner>``): one bucket per key for every server sharing the store. Only digests are stored, never a key
(engine.api.auth makes and checks keys). A store failure is NotReady with a generic message; the
log names the store by its redacted URL.
"""

from __future__ import annotations

import functools
import logging
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

from engine.errors import InvalidRequest, NotReady
from engine.serving.store.url import StoreUrl, parse_store_url, redact_text

log = logging.getLogger(__name__)
UNAVAILABLE_MESSAGE = "the key store is unavailable; retry in a moment"


@dataclass(frozen=True)
class KeyInfo:
    name: str
    key_id: str
    created_at: float


@dataclass(frozen=True)
class StoredKey:
    info: KeyInfo
    digest: str  # hex SHA-256 of the whole key


class KeyStore(Protocol):
    def add(self, stored: StoredKey) -> None:
        """Raises InvalidRequest when the name is taken."""

    def by_id(self, key_id: str) -> StoredKey | None: ...

    def list(self) -> list[KeyInfo]: ...

    def remove(self, name: str) -> bool: ...

    def count(self) -> int: ...

    def take_token(self, owner: str, per_minute: int) -> float | None:
        """Take one request from the owner's shared rate-limit bucket: 0 when admitted, else the
        seconds until one is free; None when this store keeps no buckets (one server per store:
        the process keeps them in memory)."""

    def close(self) -> None: ...


F = TypeVar("F", bound=Callable[..., Any])


def _key_store_errors(method: F) -> F:
    @functools.wraps(method)
    def wrapper(self: SqliteKeyStore | RedisKeyStore, *args: Any, **kwargs: Any) -> Any:
        health = getattr(self, "health", None)
        if health is not None:
            health.check()
        try:
            return method(self, *args, **kwargs)
        except self.errors as exc:
            if health is not None:
                raise health.failed(exc) from exc
            log.warning(
                "the key store %s failed (%s: %s)", self.shown, type(exc).__name__, redact_text(str(exc))
            )
            raise NotReady(UNAVAILABLE_MESSAGE, retry_after_s=1.0) from exc

    return cast(F, wrapper)


def _name_taken(name: str) -> InvalidRequest:
    return InvalidRequest(
        f"a key named {name!r} exists; revoke it first (`engine keys revoke {name}`) or choose another name"
    )


class SqliteKeyStore:
    """The ``api_keys`` table of the job database (WAL mode, safe beside the job store's writes:
    ``engine keys`` works while a server holds the job store's lock)."""

    errors: tuple[type[BaseException], ...] = (sqlite3.Error,)

    def __init__(self, path: str | Path, *, timeout_s: float = 5.0) -> None:
        self.path = Path(path)
        self.shown = str(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        # One connection shared by the event loop thread and the CLI; the lock keeps it serial.
        try:
            self._conn = sqlite3.connect(
                str(path), check_same_thread=False, timeout=timeout_s, isolation_level=None
            )
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS api_keys ("
                " key_id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE,"
                " digest TEXT NOT NULL, created_at REAL NOT NULL)"
            )
        except sqlite3.Error as exc:
            raise NotReady(f"cannot open the key store {path}: {exc}") from exc
        self._lock = threading.Lock()

    @_key_store_errors
    def add(self, stored: StoredKey) -> None:
        i = stored.info
        with self._lock:
            try:
                self._conn.execute(
                    "INSERT INTO api_keys (key_id, name, digest, created_at) VALUES (?, ?, ?, ?)",
                    (i.key_id, i.name, stored.digest, i.created_at),
                )
            except sqlite3.IntegrityError as exc:
                raise _name_taken(i.name) from exc

    @_key_store_errors
    def by_id(self, key_id: str) -> StoredKey | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT key_id, name, digest, created_at FROM api_keys WHERE key_id = ?", (key_id,)
            ).fetchone()
        if row is None:
            return None
        return StoredKey(info=KeyInfo(name=row[1], key_id=row[0], created_at=row[3]), digest=row[2])

    @_key_store_errors
    def list(self) -> list[KeyInfo]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT key_id, name, created_at FROM api_keys ORDER BY created_at, name"
            ).fetchall()
        return [KeyInfo(name=r[1], key_id=r[0], created_at=r[2]) for r in rows]

    @_key_store_errors
    def remove(self, name: str) -> bool:
        with self._lock:
            cur = self._conn.execute("DELETE FROM api_keys WHERE name = ?", (name,))
        return cur.rowcount > 0

    @_key_store_errors
    def count(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM api_keys").fetchone()[0])

    def take_token(self, owner: str, per_minute: int) -> float | None:
        return None  # one server per SQLite file: its buckets are in memory

    def close(self) -> None:
        with self._lock:
            self._conn.close()


# KEYS[1]: the bucket; ARGV: capacity, refill per second. Redis's clock, so that every server
# sharing the bucket measures time alike. Returns the seconds to wait ("0": admitted), as text
# (a Lua number would come back truncated to an integer).
_TAKE_TOKEN = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local cap = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(b[1]) or cap
local at = tonumber(b[2]) or now
tokens = math.min(cap, tokens + math.max(0, now - at) * rate)
local wait = 0
if tokens < 1 then wait = (1 - tokens) / rate else tokens = tokens - 1 end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(cap / rate * 1000) + 1000)
return tostring(wait)
"""


class RedisKeyStore:
    """Hashes ``<prefix>api_keys`` (id -> record) and ``<prefix>api_key_names`` (name -> id),
    and the shared rate-limit buckets ``<prefix>ratelimit:<owner>``. Like the job store, it
    fails fast (503) while Redis does not answer, instead of holding the event loop."""

    def __init__(self, url: str | StoreUrl) -> None:
        from engine.serving.store.base import StoreHealth
        from engine.serving.store.redis import connect, redis_errors

        parsed = parse_store_url(url)
        self.shown = parsed.redacted
        self.errors = redis_errors()
        self.prefix = parsed.prefix
        self.keys = parsed.prefix + "api_keys"
        self.names = parsed.prefix + "api_key_names"
        self._r: Any = connect(parsed)
        self._take = self._r.register_script(_TAKE_TOKEN)
        self.health = StoreHealth(self.shown, self._r.ping, what="key store")
        self.health.start()

    @_key_store_errors
    def take_token(self, owner: str, per_minute: int) -> float | None:
        wait = self._take(keys=[f"{self.prefix}ratelimit:{owner}"], args=[per_minute, per_minute / 60.0])
        return float(wait)

    @_key_store_errors
    def add(self, stored: StoredKey) -> None:
        i = stored.info
        if not self._r.hsetnx(self.names, i.name, i.key_id):
            raise _name_taken(i.name)
        self._r.hset(self.keys, i.key_id, f"{i.name}\t{stored.digest}\t{i.created_at!r}")

    @_key_store_errors
    def by_id(self, key_id: str) -> StoredKey | None:
        raw = self._r.hget(self.keys, key_id)
        if raw is None:
            return None
        name, dig, created = str(raw).split("\t")
        return StoredKey(info=KeyInfo(name=name, key_id=key_id, created_at=float(created)), digest=dig)

    @_key_store_errors
    def list(self) -> list[KeyInfo]:
        out = []
        for key_id, raw in self._r.hgetall(self.keys).items():
            name, _, created = str(raw).split("\t")
            out.append(KeyInfo(name=name, key_id=key_id, created_at=float(created)))
        return sorted(out, key=lambda k: (k.created_at, k.name))

    @_key_store_errors
    def remove(self, name: str) -> bool:
        key_id = self._r.hget(self.names, name)
        if key_id is None:
            return False
        self._r.hdel(self.keys, key_id)
        self._r.hdel(self.names, name)
        return True

    @_key_store_errors
    def count(self) -> int:
        return int(self._r.hlen(self.keys))

    def close(self) -> None:
        self.health.stop()
        self._r.close()


def open_key_store(url: str | StoreUrl) -> KeyStore:
    """The key store beside the job store of a store URL (every option of the URL is accepted;
    the Redis ones that apply to keys, ``prefix`` and the timeouts, are used)."""
    parsed = parse_store_url(url)
    if parsed.is_sqlite:
        return SqliteKeyStore(parsed.path)
    return RedisKeyStore(parsed)
