"""API keys and the per-key rate limit.

A key looks like ``ek_<id>_<secret>``. The store keeps the id, the name and the SHA-256 of the
whole key, never the key: a lookup finds the row by id and compares digests in constant time
(``hmac.compare_digest``), so neither a timing difference nor a leaked database reveals a key.
SHA-256 (not a slow password hash) is enough because keys carry 256 random bits.

Keys live beside the jobs: a ``sqlite:///`` store URL keeps them in an ``api_keys`` table of the
same database file, a ``redis://`` URL in the hash ``engine:api_keys``. The owner of a job is the
key's name, so a key revoked and created again under the same name sees that name's jobs.

Nothing here logs a key. Messages name the key's id at most.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from engine.errors import InvalidRequest, NotReady, Overloaded, Unauthenticated

KEY_PREFIX = "ek"
ANONYMOUS = "anonymous"  # the owner of every job when auth is disabled
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-@")
MAX_NAME_LENGTH = 64


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

    def close(self) -> None: ...


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def split_key(key: str) -> str | None:
    """The key's id, or None when it is not shaped like one of our keys."""
    parts = key.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX or not parts[1] or not parts[2]:
        return None
    return parts[1]


def validate_name(name: str) -> str:
    if not name or len(name) > MAX_NAME_LENGTH or not set(name) <= _NAME_CHARS:
        raise InvalidRequest(
            f"key name {name!r} is invalid: use 1-{MAX_NAME_LENGTH} letters, digits or . _ - @"
        )
    return name


def create_key(store: KeyStore, name: str, now: float | None = None) -> str:
    """Create and store a key; the returned key is never stored or shown again."""
    validate_name(name)
    key_id = secrets.token_hex(6)
    key = f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"
    info = KeyInfo(name=name, key_id=key_id, created_at=time.time() if now is None else now)
    store.add(StoredKey(info=info, digest=digest(key)))
    return key


class SqliteKeyStore:
    """The ``api_keys`` table of the job database (WAL mode, safe beside the job store's writes)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        # One connection shared by the event loop thread and the CLI; the lock keeps it serial.
        self._conn = sqlite3.connect(str(path), check_same_thread=False, timeout=30.0, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS api_keys ("
                " key_id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE,"
                " digest TEXT NOT NULL, created_at REAL NOT NULL)"
            )

    def add(self, stored: StoredKey) -> None:
        i = stored.info
        with self._lock:
            try:
                self._conn.execute(
                    "INSERT INTO api_keys (key_id, name, digest, created_at) VALUES (?, ?, ?, ?)",
                    (i.key_id, i.name, stored.digest, i.created_at),
                )
            except sqlite3.IntegrityError as exc:
                raise InvalidRequest(
                    f"a key named {i.name!r} exists; revoke it first (`engine keys revoke {i.name}`) "
                    "or choose another name"
                ) from exc

    def by_id(self, key_id: str) -> StoredKey | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT key_id, name, digest, created_at FROM api_keys WHERE key_id = ?", (key_id,)
            ).fetchone()
        if row is None:
            return None
        return StoredKey(info=KeyInfo(name=row[1], key_id=row[0], created_at=row[3]), digest=row[2])

    def list(self) -> list[KeyInfo]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT key_id, name, created_at FROM api_keys ORDER BY created_at, name"
            ).fetchall()
        return [KeyInfo(name=r[1], key_id=r[0], created_at=r[2]) for r in rows]

    def remove(self, name: str) -> bool:
        with self._lock:
            cur = self._conn.execute("DELETE FROM api_keys WHERE name = ?", (name,))
        return cur.rowcount > 0

    def count(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM api_keys").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class RedisKeyStore:
    """Hash ``engine:api_keys`` (id -> record) and ``engine:api_key_names`` (name -> id)."""

    KEYS = "engine:api_keys"
    NAMES = "engine:api_key_names"

    def __init__(self, url: str) -> None:
        try:
            import redis
        except ImportError as exc:  # the optional extra
            raise InvalidRequest(
                "a redis:// store needs the redis client: pip install 'flan-t5-engine[redis]'"
            ) from exc
        self._r: Any = redis.Redis.from_url(url, decode_responses=True)

    def add(self, stored: StoredKey) -> None:
        i = stored.info
        if not self._r.hsetnx(self.NAMES, i.name, i.key_id):
            raise InvalidRequest(
                f"a key named {i.name!r} exists; revoke it first (`engine keys revoke {i.name}`) "
                "or choose another name"
            )
        self._r.hset(self.KEYS, i.key_id, f"{i.name}\t{stored.digest}\t{i.created_at!r}")

    def by_id(self, key_id: str) -> StoredKey | None:
        raw = self._r.hget(self.KEYS, key_id)
        if raw is None:
            return None
        name, dig, created = str(raw).split("\t")
        return StoredKey(info=KeyInfo(name=name, key_id=key_id, created_at=float(created)), digest=dig)

    def list(self) -> list[KeyInfo]:
        out = []
        for key_id, raw in self._r.hgetall(self.KEYS).items():
            name, _, created = str(raw).split("\t")
            out.append(KeyInfo(name=name, key_id=key_id, created_at=float(created)))
        return sorted(out, key=lambda k: (k.created_at, k.name))

    def remove(self, name: str) -> bool:
        key_id = self._r.hget(self.NAMES, name)
        if key_id is None:
            return False
        self._r.hdel(self.KEYS, key_id)
        self._r.hdel(self.NAMES, name)
        return True

    def count(self) -> int:
        return int(self._r.hlen(self.KEYS))

    def close(self) -> None:
        self._r.close()


def open_key_store(store_url: str) -> KeyStore:
    """The key store that lives beside the job store of ``store_url`` (same URL forms as
    engine.serving.store.base.open_store; its options, e.g. ``?synchronous=full``, are the job
    store's and ignored here)."""
    parts = urlsplit(store_url)
    if parts.scheme == "sqlite":
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        if parts.netloc or not path:
            raise InvalidRequest(
                f"store URL {store_url!r}: use sqlite:///relative/path.db or sqlite:////absolute/path.db"
            )
        return SqliteKeyStore(path)
    if parts.scheme in ("redis", "rediss"):
        return RedisKeyStore(store_url)
    raise InvalidRequest(
        f"unsupported store URL {store_url!r}: use sqlite:///path/engine.db or redis://host:port/db"
    )


class RateLimiter:
    """Token bucket per owner: ``per_minute`` on average, bursts up to ``per_minute``."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # owner -> (tokens, last refill)
        self._lock = threading.Lock()

    def acquire(self, owner: str) -> None:
        if self.per_minute <= 0:
            return
        rate = self.per_minute / 60.0
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.get(owner, (float(self.per_minute), now))
            tokens = min(float(self.per_minute), tokens + (now - last) * rate)
            if tokens < 1.0:
                self._buckets[owner] = (tokens, now)
                wait = (1.0 - tokens) / rate
                raise Overloaded(
                    f"rate limit of {self.per_minute} requests per minute for this key reached; "
                    f"retry in {math.ceil(wait)} s",
                    retry_after_s=wait,
                )
            self._buckets[owner] = (tokens - 1.0, now)


MISSING_KEY_MESSAGE = (
    "missing API key: send it in the apiKey header (or Authorization: Bearer <key>; "
    "gRPC: metadata apikey). Create one with `engine keys create --name NAME`"
)


class Authenticator:
    """Maps an API key to its owner's name. Verified keys are remembered for ``cache_s`` seconds
    (a revoked key stops working within that time) so that polling does not hit the store."""

    def __init__(
        self,
        keys: KeyStore | None,
        *,
        rate_limit_per_minute: int = 0,
        disabled: bool = False,
        cache_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if keys is None and not disabled:
            raise ValueError("an Authenticator without a key store must be disabled")
        self._keys = keys
        self.disabled = disabled
        self.limiter = RateLimiter(rate_limit_per_minute, clock)
        self._cache_s = cache_s
        self._clock = clock
        self._cache: dict[str, tuple[str, float]] = {}  # digest -> (owner, verified at)

    def authenticate(self, api_key: str | None) -> str:
        if self.disabled:
            return ANONYMOUS
        if not api_key:
            raise Unauthenticated(MISSING_KEY_MESSAGE)
        dig = digest(api_key)
        now = self._clock()
        hit = self._cache.get(dig)
        if hit is not None and now - hit[1] < self._cache_s:
            return hit[0]
        key_id = split_key(api_key)
        stored = None
        if key_id is not None and self._keys is not None:
            try:
                stored = self._keys.by_id(key_id)
            except Exception as exc:
                raise NotReady(f"the key store cannot be read: {exc}") from exc
        # compare_digest runs even when no row matched, so that a miss takes as long as a mismatch.
        expected = stored.digest if stored is not None else "0" * 64
        if not hmac.compare_digest(dig, expected) or stored is None:
            self._cache.pop(dig, None)
            raise Unauthenticated("unknown or revoked API key")
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[dig] = (stored.info.name, now)
        return stored.info.name

    def admit(self, owner: str) -> None:
        """Counts one job-creating request against the owner's rate limit."""
        self.limiter.acquire(owner)
