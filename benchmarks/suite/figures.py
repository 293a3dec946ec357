"""From timed requests to the report's figures: percentiles, throughput, time per output token,
and speedups as medians of per-round ratios (a load spike on a shared machine skews one round of
one contender; the median of paired rounds shrugs it off).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from benchmarks.loadgen import percentile
from benchmarks.suite.matrix import Job, Kind


@dataclass(frozen=True)
class Measurement:
    """One contender handling one cell's requests in one round."""

    key: str  # Job.key: the same in every round
    contender: str
    kind: Kind
    target: str | None
    shape: str
    strategy: str
    concurrency: int
    round: int
    requests: int
    ok: int
    latencies_s: tuple[float, ...]  # of the requests that succeeded, as their client saw them
    duration_s: float  # first request sent to last answer received
    new_tokens: int  # generated tokens, counted from the answers (never assumed)
    failures: tuple[str, ...] = ()  # one line per failed request: its status and error

    @classmethod
    def of(
        cls,
        job: Job,
        round_: int,
        *,
        requests: int,
        latencies_s: Sequence[float],
        duration_s: float,
        new_tokens: int,
        failures: Sequence[str] = (),
    ) -> Measurement:
        return cls(
            key=job.key,
            contender=job.contender,
            kind=job.kind,
            target=None if job.target is None else job.target.name,
            shape=job.shape,
            strategy=job.strategy.name,
            concurrency=job.concurrency,
            round=round_,
            requests=requests,
            ok=len(latencies_s),
            latencies_s=tuple(latencies_s),
            duration_s=duration_s,
            new_tokens=new_tokens,
            failures=tuple(failures),
        )

    @property
    def requests_per_s(self) -> float:
        return self.ok / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.duration_s if self.duration_s > 0 else 0.0


@dataclass(frozen=True)
class Figures:
    """A contender on a cell, over every round."""

    key: str
    contender: str
    kind: Kind
    target: str | None
    shape: str
    strategy: str
    concurrency: int
    rounds: int
    requests: int
    ok: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    requests_per_s: float  # median over rounds
    tokens_per_s: float  # median over rounds
    # Latency / tokens of a request, p50: what a client waits per token. For engine-only and the
    # CTranslate2 baseline (every request of a call finishes together) it is the time of a step.
    tpot_ms: float

    @property
    def failed(self) -> int:
        return self.requests - self.ok


def aggregate(measurements: Iterable[Measurement]) -> list[Figures]:
    by_key: dict[str, list[Measurement]] = defaultdict(list)
    for m in measurements:
        by_key[m.key].append(m)
    out = []
    for key, ms in by_key.items():
        first = ms[0]
        latencies_ms = [s * 1000 for m in ms for s in m.latencies_s]
        ok = sum(m.ok for m in ms)
        tokens_per_request = sum(m.new_tokens for m in ms) / ok if ok else float("nan")
        p50 = percentile(latencies_ms, 50) if latencies_ms else float("nan")
        out.append(
            Figures(
                key=key,
                contender=first.contender,
                kind=first.kind,
                target=first.target,
                shape=first.shape,
                strategy=first.strategy,
                concurrency=first.concurrency,
                rounds=len(ms),
                requests=sum(m.requests for m in ms),
                ok=ok,
                p50_ms=p50,
                p90_ms=percentile(latencies_ms, 90) if latencies_ms else float("nan"),
                p99_ms=percentile(latencies_ms, 99) if latencies_ms else float("nan"),
                requests_per_s=statistics.median(m.requests_per_s for m in ms),
                tokens_per_s=statistics.median(m.tokens_per_s for m in ms),
                tpot_ms=p50 / tokens_per_request if ok else float("nan"),
            )
        )
    return out


def speedup(contender: Sequence[Measurement], baseline: Sequence[Measurement]) -> float | None:
    """Median over the rounds both ran of contender tokens/s / baseline tokens/s; None when they
    share no round or the baseline produced nothing."""
    base = {m.round: m.tokens_per_s for m in baseline}
    ratios = [m.tokens_per_s / base[m.round] for m in contender if base.get(m.round, 0.0) > 0]
    return statistics.median(ratios) if ratios else None


@dataclass(frozen=True)
class Speedups:
    vs_transformers: float | None
    vs_ctranslate2: float | None
    vs_server_b1: float | None
    vs_onnxruntime: float | None = None


def speedups_for(key: str, measurements: Sequence[Measurement]) -> Speedups:
    """Speedups of the contender ``key`` over each baseline that handled the same requests:
    Transformers one at a time (same shape and strategy), CTranslate2 direct and the server at
    --max-batch-size 1 (same target and concurrency), ONNX Runtime int8 (same concurrency: it runs
    c requests per call)."""
    mine = [m for m in measurements if m.key == key]
    if not mine:
        raise KeyError(f"no measurement of {key!r}")
    me = mine[0]

    def of(kind: Kind, same_target: bool, same_concurrency: bool | None = None) -> float | None:
        same_concurrency = same_target if same_concurrency is None else same_concurrency
        base = [
            m
            for m in measurements
            if m.kind is kind
            and m.shape == me.shape
            and m.strategy == me.strategy
            and (not same_target or m.target == me.target)
            and (not same_concurrency or m.concurrency == me.concurrency)
        ]
        return speedup(mine, base) if base else None

    return Speedups(
        of(Kind.HF, False), of(Kind.CT2, True), of(Kind.SERVER_B1, True), of(Kind.ONNX, False, True)
    )
