"""One frozen configuration object, built once: CLI flags, then ``ENGINE_*`` environment, then defaults.

Everything below the CLI receives a ``Config`` (or the part of it that it needs); nothing reads the
environment on its own.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from engine.errors import InvalidRequest
from engine.limits import (
    DEFAULT_MAX_NEW_TOKENS_LIMIT,
    DEFAULT_MAX_PROMPT_BYTES,
    DEFAULT_MAX_PROMPTS_PER_REQUEST,
    RequestLimits,
)


@dataclass(frozen=True)
class Config:
    # model and runtime
    model_dir: str | None = None  # None: make serve's default (./models/flan-t5-small, Hub, demo)
    device: str = "cpu"  # "cpu" | "cuda" | "auto"
    compute_type: str | None = None  # None: int8 on CPU, float16 on CUDA
    inter_threads: int = 1
    intra_threads: int = 0  # 0: one per core
    # The engine's threads under SCHED_BATCH (Linux), so that they never delay the event loop
    # when they wake (engine/serving/worker.py). ENGINE_BATCH_SCHEDULING=0 turns it off.
    batch_scheduling: bool = True
    # CPU contrastive decoder: the compiled small-batch kernel where it built (engine/runtime/
    # qlinear.py); ENGINE_QLINEAR=0 runs numpy/OpenBLAS alone.
    qlinear: bool = True
    # CUDA only: the contrastive decoder replays a captured CUDA graph per step instead of
    # launching its operations one by one (engine/runtime/cuda_graphs.py). Experimental: off until
    # it has run on a GPU; ENGINE_CUDA_GRAPHS=1 turns it on.
    cuda_graphs: bool = False
    # transports
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    grpc_host: str = "127.0.0.1"
    grpc_port: int = 50051
    grpc_target: str | None = None  # REST shim only: forward to this remote gRPC server
    public_url: str | None = None  # base of responseUrl; default: the request's own host
    # store and queue
    store_url: str = "sqlite:///./data/engine.db"
    max_queue_size: int = 10_000
    # Prompt tokens of every queued job together: the memory held for queued work (token ids, job
    # text) is bounded by tokens, not only by a job count (64 long prompts a job add up fast).
    max_queued_tokens: int = 2_000_000
    # One API key's share of the queue (429 with Retry-After past it); fair turns (batching.py)
    # keep one key's backlog from delaying the others, these keep it from filling the queue.
    max_queued_jobs_per_key: int = 2_000
    max_queued_tokens_per_key: int = 500_000
    job_timeout_s: float = 600.0
    result_ttl_s: float = 24 * 3600.0
    # dynamic batcher
    max_batch_size: int = 32
    max_batch_tokens: int = 16_384
    # A lone job waits this long for company when the engine is idle; while the engine is busy,
    # batches fill by themselves. 2 ms keeps the queue path under 5 ms p50 (benchmarks/RESULTS.md).
    max_queue_delay_ms: float = 2.0
    # Which loop serves greedy requests: "continuous" (our decoder's batch: rows join and leave
    # between steps, so a short job never waits for a long one), "batch" (one-shot batched engine
    # calls) or "auto": continuous where it was measured faster (engine/runtime/backends.py,
    # GREEDY_CONTINUOUS: CPU int8), batch elsewhere.
    greedy_lane: str = "auto"
    # limits on a request (engine/limits.py: defined there, checked once at the edge)
    max_new_tokens_limit: int = DEFAULT_MAX_NEW_TOKENS_LIMIT
    max_prompts_per_request: int = DEFAULT_MAX_PROMPTS_PER_REQUEST  # the prompt array's length
    max_prompt_bytes: int = DEFAULT_MAX_PROMPT_BYTES  # UTF-8 bytes of one prompt
    rate_limit_per_minute: int = 600  # per API key; 0 disables
    # logging
    log_format: str = "text"  # "text" | "json"
    access_log: bool = False
    # demo fallback / auth
    allow_demo_model: bool = True  # no --model and no model found: serve the random-weight demo model
    auth_disabled: bool = False  # no API keys: every request is accepted (local experiments only)

    @property
    def request_limits(self) -> RequestLimits:
        """The limits the edge checks, and the transports' byte limits derived from them."""
        return RequestLimits(
            max_new_tokens=self.max_new_tokens_limit,
            max_prompts=self.max_prompts_per_request,
            max_prompt_bytes=self.max_prompt_bytes,
        )

    def with_overrides(self, **changes: Any) -> Config:
        return replace(self, **changes)

    @classmethod
    def build(
        cls, flags: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
    ) -> Config:
        """Flags (None values ignored) win over ``ENGINE_<NAME>`` variables, which win over defaults."""
        flags = flags or {}
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            if flags.get(f.name) is not None:
                values[f.name] = flags[f.name]
                continue
            env_name = f"ENGINE_{f.name.upper()}"
            if env_name in environ:
                values[f.name] = _parse(env_name, environ[env_name], f.default)
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        positive = (
            "max_batch_size",
            "max_batch_tokens",
            "max_queue_size",
            "max_queued_tokens",
            "max_queued_jobs_per_key",
            "max_queued_tokens_per_key",
            "max_new_tokens_limit",
            "max_prompts_per_request",
            "max_prompt_bytes",
            "inter_threads",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise InvalidRequest(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("job_timeout_s", "result_ttl_s"):
            if getattr(self, name) <= 0:
                raise InvalidRequest(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_queue_delay_ms < 0 or self.intra_threads < 0 or self.rate_limit_per_minute < 0:
            raise InvalidRequest("max_queue_delay_ms, intra_threads and rate_limit_per_minute must be >= 0")
        if self.log_format not in ("text", "json"):
            raise InvalidRequest(f"log_format must be text or json, got {self.log_format!r}")
        if self.greedy_lane not in ("auto", "continuous", "batch"):
            raise InvalidRequest(f"greedy_lane must be auto, continuous or batch, got {self.greedy_lane!r}")
        if self.device not in ("cpu", "cuda", "auto"):
            raise InvalidRequest(f"device must be cpu, cuda or auto, got {self.device!r}")
        for name in ("http_port", "grpc_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise InvalidRequest(f"{name} must be a TCP port (0-65535), got {getattr(self, name)}")


def _parse(name: str, raw: str, default: Any) -> Any:
    try:
        if isinstance(default, bool):
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError as exc:
        raise InvalidRequest(
            f"environment variable {name}={raw!r} is not a valid {type(default).__name__}"
        ) from exc
    return raw
