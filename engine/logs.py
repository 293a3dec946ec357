"""Logging for every command: text (the default) or JSON, one object per line.

A JSON line has ``ts``, ``level``, ``logger``, ``message`` and, where known, ``job_id`` and
``key_name`` (the API key's name, never the key: keys are never handed to a logger), plus
``exc`` for a traceback. Job ids and key names come from the record's ``extra`` or, inside a
request, from the context that the servicer binds once it has authenticated the key
(:func:`bind`), so that every line a request causes carries them.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import sys
from contextvars import ContextVar
from typing import Any

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Record attributes that travel into a JSON line when set (by `extra=` or by bind()).
FIELDS = ("job_id", "key_name")
# The access log's fields (engine/api/access_log.py).
ACCESS_FIELDS = ("method", "path", "status", "duration_ms", "client")

_job_id: ContextVar[str | None] = ContextVar("job_id", default=None)
_key_name: ContextVar[str | None] = ContextVar("key_name", default=None)


def bind(*, job_id: str | None = None, key_name: str | None = None) -> None:
    """Attach a job id and/or key name to every record logged from here on in this context (a
    request's task)."""
    if job_id is not None:
        _job_id.set(job_id)
    if key_name is not None:
        _key_name.set(key_name)


def bound() -> dict[str, str]:
    """What :func:`bind` attached in this context."""
    out = {}
    if (job_id := _job_id.get()) is not None:
        out["job_id"] = job_id
    if (key_name := _key_name.get()) is not None:
        out["key_name"] = key_name
    return out


class ContextFilter(logging.Filter):
    """Copies the context's job id and key name onto records that do not carry their own."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in bound().items():
            if getattr(record, name, None) is None:
                setattr(record, name, value)
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _dt.datetime.fromtimestamp(record.created, _dt.timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in (*FIELDS, *ACCESS_FIELDS):
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """The plain format, with ``[job=... key=...]`` appended where known."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        tags = " ".join(f"{n.split('_')[0]}={getattr(record, n)}" for n in FIELDS if getattr(record, n, None))
        if not tags:
            return text
        first, sep, rest = text.partition("\n")
        return f"{first} [{tags}]{sep}{rest}"


def configure(fmt: str = "text", *, verbose: bool = False) -> None:
    """One handler on the root logger (stderr), in the given format; replaces any earlier one."""
    if fmt not in FORMATS:
        from engine.errors import InvalidRequest

        raise InvalidRequest(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
