"""report.md: the issue's targets (pass/fail) first, then the machine, one table per shape and
strategy, the floor, and what was skipped. Built from measurements alone, so a test can feed it
made-up figures and check every verdict.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from benchmarks.common import table
from benchmarks.suite.figures import Figures, Measurement, aggregate, speedup, speedups_for
from benchmarks.suite.floor import floor_for, shape_of, weight_bytes, weights_per_step
from benchmarks.suite.matrix import STRATEGIES, TARGETS, Kind, Plan

# Issue 6: at concurrency 16, FLAN-T5-small shapes, CPU: the server's throughput over
# Transformers handling the same requests one at a time.
ISSUE_SHAPE = "small"
ISSUE_CONCURRENCY = 16
ISSUE_TARGETS: dict[str, float] = {"greedy": 4.0, "contrastive": 3.0}


@dataclass(frozen=True)
class TargetCheck:
    strategy: str
    target: str
    required: float
    ratio: float | None  # None: not measured in this run
    server_tokens_per_s: float | None
    transformers_tokens_per_s: float | None

    @property
    def verdict(self) -> str:
        if self.ratio is None:
            return "not measured"
        return "PASS" if self.ratio >= self.required else "FAIL"


def issue_checks(plan: Plan, measurements: Sequence[Measurement]) -> list[TargetCheck]:
    """One row per CPU target and issue strategy: the ratio when this run measured both sides."""
    figures = {f.key: f for f in aggregate(measurements)}
    checks = []
    for strategy, required in ISSUE_TARGETS.items():
        for target in [t for t in plan.targets if not t.is_cuda] or [TARGETS["cpu-int8"]]:
            ours = [
                m
                for m in measurements
                if m.kind is Kind.SERVER
                and m.shape == ISSUE_SHAPE
                and m.strategy == strategy
                and m.target == target.name
                and m.concurrency == ISSUE_CONCURRENCY
            ]
            hf = [
                m
                for m in measurements
                if m.kind is Kind.HF and m.shape == ISSUE_SHAPE and m.strategy == strategy
            ]
            ratio = speedup(ours, hf) if ours and hf else None
            checks.append(
                TargetCheck(
                    strategy=strategy,
                    target=target.name,
                    required=required,
                    ratio=ratio,
                    server_tokens_per_s=figures[ours[0].key].tokens_per_s if ours else None,
                    transformers_tokens_per_s=figures[hf[0].key].tokens_per_s if hf else None,
                )
            )
    return checks


def _x(value: float | None) -> str:
    return "" if value is None or math.isnan(value) else f"{value:.2f}x"


def _num(value: float | None, digits: int = 1) -> str:
    return "" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def summary_table(checks: Sequence[TargetCheck]) -> str:
    rows = [
        [
            f"{c.strategy} (>= {c.required:g}x)",
            c.target,
            _num(c.server_tokens_per_s),
            _num(c.transformers_tokens_per_s),
            _x(c.ratio),
            c.verdict,
        ]
        for c in checks
    ]
    headers = [
        "issue 6 target",
        "server target",
        f"server tokens/s at c={ISSUE_CONCURRENCY}",
        "Transformers tokens/s, one at a time",
        "ratio (median of rounds)",
        "verdict",
    ]
    return table(headers, rows)


def cell_table(
    plan: Plan, shape: str, strategy: str, measurements: Sequence[Measurement], bandwidth: float
) -> str:
    figures = sorted(
        (f for f in aggregate(measurements) if f.shape == shape and f.strategy == strategy),
        key=lambda f: (f.concurrency, list(Kind).index(f.kind), f.target or ""),
    )
    rows: list[list[Any]] = []
    for f in figures:
        s = speedups_for(f.key, measurements)
        floor_pct = ""
        if f.target is not None and f.ok:
            floor = floor_for(shape, TARGETS[f.target], STRATEGIES[strategy], bandwidth)
            floor_pct = f"{100 * floor.fraction(f.tpot_ms):.0f}%"
        rows.append(
            [
                f.contender,
                "1 (sequential)" if f.kind is Kind.HF else f.concurrency,
                f"{f.ok}/{f.requests}",
                _num(f.p50_ms, 0),
                _num(f.p90_ms, 0),
                _num(f.p99_ms, 0),
                _num(f.requests_per_s, 2),
                _num(f.tokens_per_s),
                _num(f.tpot_ms, 2),
                _x(s.vs_transformers) if f.kind is not Kind.HF else "1.00x",
                _x(s.vs_ctranslate2) if f.kind in (Kind.SERVER, Kind.ENGINE) else "",
                _x(s.vs_server_b1) if f.kind in (Kind.SERVER, Kind.ENGINE) else "",
                _x(s.vs_onnxruntime) if f.kind in (Kind.SERVER, Kind.ENGINE) else "",
                floor_pct,
            ]
        )
    headers = [
        "contender",
        "concurrency",
        "ok/requests",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "requests/s",
        "tokens/s",
        "ms per output token",
        "vs Transformers",
        "vs CTranslate2",
        "vs server b1",
        "vs ONNX Runtime int8",
        "of floor",
    ]
    return table(headers, rows)


def floor_table(plan: Plan, bandwidth: float) -> str:
    rows = []
    for shape in plan.shapes:
        for target in plan.targets:
            for strategy in plan.strategies:
                floor = floor_for(shape, target, strategy, bandwidth)
                rows.append(
                    [
                        shape,
                        target.name,
                        strategy.name,
                        f"{weights_per_step(shape_of(shape)) / 1e6:.1f} M x {weight_bytes(target, strategy)} B",
                        f"{floor.bytes_per_step / 1e6:.1f}",
                        f"{floor.ms_per_step:.2f}",
                    ]
                )
    return table(
        ["shape", "target", "strategy", "weights per step", "MB per step", "floor ms per step"], rows
    )


def failures_section(measurements: Sequence[Measurement]) -> list[str]:
    lines = []
    for m in measurements:
        for failure in m.failures[:3]:
            lines.append(
                f"- {m.contender}, {m.shape} {m.strategy} c={m.concurrency} round {m.round}: {failure}"
            )
        if len(m.failures) > 3:
            lines.append(f"- ... and {len(m.failures) - 3} more in that cell")
    return lines


def render(
    *,
    run_id: str,
    command: str,
    plan: Plan,
    machine: dict[str, Any],
    load_before: Sequence[float],
    load_after: Sequence[float],
    measurements: Sequence[Measurement],
    plots: Sequence[str],
    notes: Sequence[str] = (),
) -> str:
    bandwidth = float(machine["bandwidth_gb_per_s"])
    checks = issue_checks(plan, measurements)
    out = [
        f"# Benchmark report {run_id}",
        "",
        f"- command: `{command}`",
        f"- preset: {plan.preset}; shapes {', '.join(plan.shapes)}; strategies "
        f"{', '.join(s.name for s in plan.strategies)}; concurrency {', '.join(map(str, plan.concurrency))}; "
        f"targets {', '.join(t.name for t in plan.targets)}",
        f"- {plan.requests} requests per cell and round, {plan.rounds} interleaved rounds (the order rotates "
        f"each round); prompts of {plan.prompt_tokens}+ tokens, {plan.new_tokens} new tokens forced "
        f"(min_new_tokens = max_new_tokens); random weights with FLAN-T5 shapes",
        f"- load average (1, 5, 15 min) before: {', '.join(f'{x:.2f}' for x in load_before)}; "
        f"after: {', '.join(f'{x:.2f}' for x in load_after)}",
        "",
        "## Summary: issue 6's targets",
        "",
        f"FLAN-T5-{ISSUE_SHAPE} shapes, CPU, concurrency {ISSUE_CONCURRENCY}: the server's throughput "
        "(REST, closed loop) over Transformers' generate() handling the same requests one at a time.",
        "",
        summary_table(checks),
        "",
        "## Machine",
        "",
        table(["what", "value"], [[k, _flat(v)] for k, v in machine.items()]),
        "",
        "## How to read the tables",
        "",
        "- latency: per request, as its client saw it (server: submit to completion over REST with "
        "long polling; engine-only and CTranslate2: the call that held it; Transformers: one generate()).",
        "- requests/s and tokens/s: successful requests and generated tokens (counted from the answers) "
        "over the cell's wall time; medians over rounds. Speedups: medians over rounds of tokens/s ratios.",
        "- ms per output token: p50 latency / tokens per request (engine-only and CTranslate2: the time "
        "of one decoder step of the batch, encoder included).",
        "- of floor: floor ms per step / ms per output token, the share of the memory-bandwidth floor "
        "reached (see the floor section).",
        "- server b1: the same server at --max-batch-size 1 (target "
        f"{plan.b1_target.name}); Transformers: float32 on CPU in .venv-ref, one request at a time.",
        *[f"- {note}" for note in notes],
    ]
    for shape in plan.shapes:
        for strategy in plan.strategies:
            out += [
                "",
                f"## {shape}, {strategy.name}",
                "",
                cell_table(plan, shape, strategy.name, measurements, bandwidth),
            ]
    out += [
        "",
        "## Floor: weight bytes per decoder step / measured bandwidth",
        "",
        f"Bandwidth {bandwidth:.2f} GB/s ({machine.get('bandwidth_method', '')}). Contrastive search runs on "
        "our own decoder, which holds float32 weights on CPU whatever the CTranslate2 compute type.",
        "",
        floor_table(plan, bandwidth),
    ]
    if plots:
        out += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    out += ["", "## Skipped", ""]
    out += [f"- {s.what}: {s.reason}" for s in plan.skipped] or ["- nothing"]
    failures = failures_section(measurements)
    out += ["", "## Failed requests", ""] + (failures or ["- none"])
    return "\n".join(out) + "\n"


def _flat(value: Any) -> str:
    if isinstance(value, list):
        return "; ".join(_flat(v) for v in value) or "none"
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items()) or "none"
    return str(value)


def figures_json(measurements: Sequence[Measurement]) -> list[dict[str, Any]]:
    out = []
    for f in aggregate(measurements):
        s = speedups_for(f.key, measurements)
        out.append(
            {
                **_figures_dict(f),
                "vs_transformers": s.vs_transformers,
                "vs_ctranslate2": s.vs_ctranslate2,
                "vs_server_b1": s.vs_server_b1,
                "vs_onnxruntime": s.vs_onnxruntime,
            }
        )
    return out


def _figures_dict(f: Figures) -> dict[str, Any]:
    return {
        "key": f.key,
        "contender": f.contender,
        "kind": f.kind.value,
        "target": f.target,
        "shape": f.shape,
        "strategy": f.strategy,
        "concurrency": f.concurrency,
        "rounds": f.rounds,
        "requests": f.requests,
        "ok": f.ok,
        "p50_ms": f.p50_ms,
        "p90_ms": f.p90_ms,
        "p99_ms": f.p99_ms,
        "requests_per_s": f.requests_per_s,
        "tokens_per_s": f.tokens_per_s,
        "tpot_ms": f.tpot_ms,
    }
