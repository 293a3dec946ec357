"""Store URLs: parsed once, here, for every command that opens a store (``serve``, ``keys``, the
job store and the key store beside it).

- ``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db``, ``sqlite:///:memory:``;
  options ``synchronous`` (``normal``: a commit survives a process crash; ``full``: fsync every
  commit) and ``timeout_s`` (how long a write waits for another process's lock, default 0.5).
- ``redis://[[user]:password@]host[:port][/db]`` (``rediss://`` for TLS); options ``prefix``
  (default ``engine:``: jobs under ``<prefix>jobs:``, keys and rate limits beside them),
  ``lease_s`` (a running job's lease, default 30), ``timeout_s`` (one Redis call, default 1) and
  ``connect_timeout_s`` (default 1).

A URL may carry a password: ``StoreUrl`` never shows it. Its ``str()`` and ``repr()`` are the
redacted form (``redis://:***@host:6379/0``), and every message about a store uses that form.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote, urlsplit

from engine.errors import InvalidRequest

SQLITE_OPTIONS = ("synchronous", "timeout_s")
REDIS_OPTIONS = ("prefix", "lease_s", "timeout_s", "connect_timeout_s")
DEFAULT_REDIS_PREFIX = "engine:"
DEFAULT_LEASE_S = 30.0
DEFAULT_SQLITE_TIMEOUT_S = 0.5
DEFAULT_REDIS_TIMEOUT_S = 1.0
DEFAULT_REDIS_CONNECT_TIMEOUT_S = 1.0
EXAMPLES = "sqlite:///./data/engine.db or redis://[:password@]host:6379/0"


@dataclass(frozen=True)
class StoreUrl:
    """A parsed store URL. ``client_url`` (Redis only) is what the Redis client connects to: it
    holds the password, so it is never logged; ``redacted`` is for everything else."""

    scheme: str  # "sqlite" | "redis" | "rediss"
    redacted: str
    path: str = ""  # SQLite: the database file (or ":memory:")
    synchronous: str = "normal"  # SQLite
    timeout_s: float = DEFAULT_SQLITE_TIMEOUT_S  # SQLite: lock wait; Redis: one call
    client_url: str = field(default="", repr=False)  # Redis, with the password
    prefix: str = DEFAULT_REDIS_PREFIX  # Redis
    lease_s: float = DEFAULT_LEASE_S  # Redis
    connect_timeout_s: float = DEFAULT_REDIS_CONNECT_TIMEOUT_S  # Redis

    @property
    def is_sqlite(self) -> bool:
        return self.scheme == "sqlite"

    @property
    def is_redis(self) -> bool:
        return self.scheme in ("redis", "rediss")

    @property
    def jobs_prefix(self) -> str:
        return self.prefix + "jobs:"

    def __str__(self) -> str:
        return self.redacted

    def __repr__(self) -> str:
        return f"StoreUrl({self.redacted!r})"


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***`` (and nothing else changed)."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<unparseable store URL>"
    if password is None and "@" not in parts.netloc:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = f"{host}:{port}" if port is not None else host
    user = parts.username or ""
    netloc = f"{user}:***@{netloc}"
    return parts._replace(netloc=netloc).geturl()


_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:@/\s]*):[^@/\s]*@")


def redact_text(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***`` (for exception texts)."""
    return _CREDENTIALS.sub(r"\g<scheme>\g<user>:***@", text)


def parse_store_url(url: str | StoreUrl) -> StoreUrl:
    """Parse and check a store URL; InvalidRequest (naming the URL in its redacted form) when
    something is wrong."""
    if isinstance(url, StoreUrl):
        return url
    shown = redact(url)
    try:
        parts = urlsplit(url)
        query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError as exc:
        raise InvalidRequest(f"store URL {shown!r} cannot be parsed; use {EXAMPLES}") from exc
    options = {k: v[-1] for k, v in query.items()}
    if parts.scheme == "sqlite":
        return _sqlite(parts.netloc, parts.path, options, shown)
    if parts.scheme in ("redis", "rediss"):
        return _redis(parts.scheme, url, options, shown)
    raise InvalidRequest(f"store URL {shown!r} is not supported; use {EXAMPLES}")


def _check_options(options: dict[str, str], known: tuple[str, ...], shown: str) -> None:
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise InvalidRequest(
            f"store URL {shown!r}: unknown option(s) {', '.join(unknown)}; known: {', '.join(known)}"
        )


def _seconds(options: dict[str, str], name: str, default: float, shown: str) -> float:
    raw = options.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise InvalidRequest(f"store URL {shown!r}: {name} must be a positive number of seconds, got {raw!r}")
    return value


def _sqlite(netloc: str, path: str, options: dict[str, str], shown: str) -> StoreUrl:
    if netloc:
        raise InvalidRequest(
            f"store URL {shown!r}: a SQLite URL has no host; use sqlite:///relative/path.db "
            "or sqlite:////absolute/path.db"
        )
    path = unquote(path[1:] if path.startswith("/") else path)
    if not path:
        raise InvalidRequest(f"store URL {shown!r} names no database file, e.g. sqlite:///./data/engine.db")
    _check_options(options, SQLITE_OPTIONS, shown)
    synchronous = options.get("synchronous", "normal").lower()
    if synchronous not in ("normal", "full"):
        raise InvalidRequest(f"store URL {shown!r}: synchronous must be normal or full, got {synchronous!r}")
    return StoreUrl(
        scheme="sqlite",
        redacted=shown,
        path=path,
        synchronous=synchronous,
        timeout_s=_seconds(options, "timeout_s", DEFAULT_SQLITE_TIMEOUT_S, shown),
    )


def _redis(scheme: str, url: str, options: dict[str, str], shown: str) -> StoreUrl:
    _check_options(options, REDIS_OPTIONS, shown)
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        raise InvalidRequest(f"store URL {shown!r}: the port must be a number from 1 to 65535") from exc
    if not parts.hostname:
        raise InvalidRequest(f"store URL {shown!r} names no host, e.g. redis://127.0.0.1:6379/0")
    db = parts.path.strip("/") or "0"
    if not db.isdigit():
        raise InvalidRequest(f"store URL {shown!r}: the database must be a number (redis://host:6379/0)")
    prefix = options.get("prefix", DEFAULT_REDIS_PREFIX)
    if not prefix:
        raise InvalidRequest(f"store URL {shown!r}: prefix must not be empty")
    return StoreUrl(
        scheme=scheme,
        redacted=redact(parts._replace(query="").geturl()) + ("?" + _safe_query(options) if options else ""),
        client_url=parts._replace(query="", path=f"/{db}").geturl(),
        prefix=prefix,
        lease_s=_seconds(options, "lease_s", DEFAULT_LEASE_S, shown),
        timeout_s=_seconds(options, "timeout_s", DEFAULT_REDIS_TIMEOUT_S, shown),
        connect_timeout_s=_seconds(options, "connect_timeout_s", DEFAULT_REDIS_CONNECT_TIMEOUT_S, shown),
    )


def _safe_query(options: dict[str, str]) -> str:
    return "&".join(f"{k}={v}" for k, v in sorted(options.items()))
