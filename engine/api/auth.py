"""API keys and the per-key rate limit.

A key looks like ``ek_<id>_<secret>``. The store keeps the id, the name and the SHA-256 of the
whole key, never the key: a lookup finds the row by id and compares digests in constant time
(``hmac.compare_digest``), so neither a timing difference nor a leaked database reveals a key.
SHA-256 (not a slow password hash) is enough because keys carry 256 random bits.

Keys live beside the jobs, in the key store of the same store URL (engine.serving.store.keys).
The owner of a job is the key's name, so a key revoked and created again under the same name sees
that name's jobs.

Nothing here logs a key. Messages name the key's id at most.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable

from engine import logs
from engine.errors import EngineError, InvalidRequest, NotReady, Overloaded, Unauthenticated
from engine.serving.store.keys import KeyInfo, KeyStore, SqliteKeyStore, StoredKey, open_key_store

# The key stores moved beside the job stores (engine.serving.store.keys); these names stay
# importable from here for the callers written before.
__all__ = ["Authenticator", "KeyStore", "RateLimiter", "SqliteKeyStore", "create_key", "open_key_store"]

log = logging.getLogger(__name__)

KEY_PREFIX = "ek"
ANONYMOUS = "anonymous"  # the owner of every job when auth is disabled
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-@")
MAX_NAME_LENGTH = 64


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
                raise rate_limited(self.per_minute, (1.0 - tokens) / rate)
            self._buckets[owner] = (tokens - 1.0, now)


MISSING_KEY_MESSAGE = (
    "missing API key: send it in the apiKey header (or Authorization: Bearer <key>; "
    "gRPC: metadata apikey). Create one with `engine keys create --name NAME`"
)


def rate_limited(per_minute: int, wait_s: float) -> Overloaded:
    return Overloaded(
        f"rate limit of {per_minute} requests per minute for this key reached; retry in {math.ceil(wait_s)} s",
        retry_after_s=wait_s,
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
            logs.bind(key_name=hit[0])  # the request's log lines carry the key's name, never the key
            return hit[0]
        key_id = split_key(api_key)
        stored = None
        if key_id is not None and self._keys is not None:
            try:
                stored = self._keys.by_id(key_id)
            except EngineError:
                raise
            except Exception as exc:
                log.error("the key store failed (%s)", type(exc).__name__)
                raise NotReady("the key store is unavailable; retry in a moment") from exc
        # compare_digest runs even when no row matched, so that a miss takes as long as a mismatch.
        expected = stored.digest if stored is not None else "0" * 64
        if not hmac.compare_digest(dig, expected) or stored is None:
            self._cache.pop(dig, None)
            raise Unauthenticated("unknown or revoked API key")
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[dig] = (stored.info.name, now)
        logs.bind(key_name=stored.info.name)
        return stored.info.name

    def admit(self, owner: str) -> None:
        """Counts one job-creating request against the owner's rate limit: in the key store's
        shared bucket where it keeps them (Redis: one bucket per key for every server), else in
        this process's."""
        per_minute = self.limiter.per_minute
        if per_minute <= 0 or self._keys is None:
            self.limiter.acquire(owner)
            return
        wait = self._keys.take_token(owner, per_minute)
        if wait is None:
            self.limiter.acquire(owner)
        elif wait > 0:
            raise rate_limited(per_minute, wait)
