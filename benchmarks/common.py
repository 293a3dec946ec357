"""Shared benchmark helpers: the machine, interleaved timing, medians and ratios, JSON, tables.

The machine the benchmarks run on is shared and noisy, so every benchmark measures its baseline
and its contenders in the same process, interleaved round by round (the order rotates each round),
and reports medians and the median of per-round ratios, which a load spike skews the least.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

OUT_DIR = Path(__file__).resolve().parent / "out"


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    """What a figure was measured on: CPU, cores, load at the time, versions, UTC date."""
    info: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "cpu": cpu_model(),
        "cores": cores(),
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
    }
    for module in ("ctranslate2", "torch", "transformers", "numpy"):
        try:
            info[module] = __import__(module).__version__
        except ImportError:
            continue
    return info


@dataclass(frozen=True)
class Stats:
    median_s: float
    min_s: float
    max_s: float
    runs: int

    @classmethod
    def of(cls, times: Sequence[float]) -> Stats:
        return cls(statistics.median(times), min(times), max(times), len(times))


@dataclass(frozen=True)
class Timings:
    """Per contender, per round: wall seconds and this process's CPU seconds (all threads).

    CPU time barely moves when other processes load the machine, wall time does; with threads
    that spin while they wait (OpenMP), CPU time also counts the spinning.
    """

    wall: dict[str, list[float]]
    cpu: dict[str, list[float]]


def interleaved(contenders: Mapping[str, Callable[[], object]], *, repeats: int, warmup: int = 1) -> Timings:
    """``repeats`` rounds, one call of each contender per round, the order rotating each round."""
    names = list(contenders)
    for name in names:
        for _ in range(warmup):
            contenders[name]()
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            start, start_cpu = time.perf_counter(), time.process_time()
            contenders[name]()
            cpu[name].append(time.process_time() - start_cpu)
            wall[name].append(time.perf_counter() - start)
    return Timings(wall, cpu)


def ratio_median(baseline: Sequence[float], contender: Sequence[float]) -> float:
    """Median over rounds of baseline time / contender time (how many times faster)."""
    return statistics.median(b / c for b, c in zip(baseline, contender, strict=True))


def save_json(name: str, payload: Mapping[str, Any]) -> Path:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (it reads fine in a terminal too)."""
    cells = [[str(h) for h in headers], *[[_cell(v) for v in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)
