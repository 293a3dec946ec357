"""Prometheus metrics (contract: the names in docs/metrics.md). One ``Metrics`` object per process,
created at start and passed to the layers that observe; ``/metrics`` renders its registry."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

from engine.errors import NotReady

# How stale engine_queue_depth may be on a shared store (a Redis round trip per read), seconds.
SHARED_DEPTH_MAX_AGE_S = 1.0

# Milliseconds to minutes.
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)
PER_TOKEN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LENGTH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "engine_requests", "API requests by route and status code", ["route", "code"], registry=r
        )
        # Read from the job store when scraped: see watch_queue_depth.
        self.queue_depth = Gauge("engine_queue_depth", "Jobs waiting in the queue", registry=r)
        self.jobs_running = Gauge("engine_jobs_running", "Jobs being generated now", registry=r)
        self.queue_wait = Histogram(
            "engine_queue_wait_seconds",
            "Time from submit to start of generation",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "engine_batch_size",
            "Prompts per engine call (rows per contrastive step)",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.inference = Histogram(
            "engine_inference_seconds", "Engine time per batch", buckets=LATENCY_BUCKETS, registry=r
        )
        self.request_latency = Histogram(
            "engine_request_latency_seconds",
            "Time from submit to completion of a job",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.time_per_output_token = Histogram(
            "engine_time_per_output_token_seconds",
            "Generation time divided by generated tokens, per job",
            buckets=PER_TOKEN_BUCKETS,
            registry=r,
        )
        self.generated_tokens = Counter("engine_generated_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("engine_prompt_tokens", "Prompt tokens processed", registry=r)
        self.jobs = Counter(
            "engine_jobs",
            "Jobs finished by final status; completed jobs also by finish_reason: length if a prompt "
            "reached max_new_tokens, else stop if a stop sequence ended one, else eos",
            ["status", "finish_reason"],
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "engine_time_to_first_token_seconds",
            "Time from submit to the job's first generated token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_length = Histogram(
            "engine_prompt_length_tokens",
            "Input tokens per prompt of completed jobs",
            buckets=LENGTH_BUCKETS,
            registry=r,
        )
        self.generation_length = Histogram(
            "engine_generation_length_tokens",
            "Generated tokens per prompt of completed jobs",
            buckets=LENGTH_BUCKETS,
            registry=r,
        )
        self.model_info = Gauge(
            "engine_model_info", "The served model (value 1)", ["model", "device", "compute_type"], registry=r
        )
        # process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds, ... (Linux).
        ProcessCollector(registry=r)

    def watch_queue_depth(self, read: Callable[[], int], *, max_age_s: float = 0.0) -> None:
        """``engine_queue_depth`` is ``read()`` (the job store's queue depth: shared by every
        server on a shared store) at scrape time, not written on each submit and claim; read at most
        once per ``max_age_s`` (a shared store's read is a round trip)."""
        self.queue_depth.set_function(CachedRead(read, max_age_s))

    def job_ended(self, status: str, finish_reason: str = "") -> None:
        """Count a finished job (``finish_reason`` only for completed ones)."""
        self.jobs.labels(status=status, finish_reason=finish_reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class CachedRead:
    """A gauge's value read at scrape time, at most once per ``max_age_s``. While the store does
    not answer (NotReady: its StoreHealth logs that), the last value read is shown (NaN before
    the first), so that /metrics still renders."""

    def __init__(
        self, read: Callable[[], int], max_age_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._read = read
        self._max_age_s = max_age_s
        self._clock = clock
        self._value = math.nan
        self._read_at = -math.inf
        self._lock = threading.Lock()  # scrapes may come from several threads

    def __call__(self) -> float:
        with self._lock:
            now = self._clock()
            if now - self._read_at >= self._max_age_s:
                try:
                    self._value = float(self._read())
                    self._read_at = now
                except NotReady:
                    pass
            return self._value
