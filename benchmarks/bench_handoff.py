"""The kernel's products on two threads, where the pool's hand-off is a large part of a call: two
checkouts side by side, each in a process of its own (one pool each: two pools in one process, as
bench_kernel_ab.py would run them, share the two cores with three threads), rounds alternating.

Small products (FLAN-T5-small's attention output and cross Q shapes, 512 x 384 and 384 x 512) and
a large one (wi, 2048 x 512) at 8 and 32 rows (greedy and contrastive at batch 8), and the fused
Q/K/V (1152 x 512) at one row (a decoder step at batch 1), int8 activations (mode 4), weights in
cache: every case large enough for both threads (a one-thread case would let the helper fall
asleep, and its waking would be measured instead). Each worker warms up with a few thousand calls
of a case (threads settle on their cores) and then reports the mean microseconds of a call over
batches of 200, the best and the median batch.

    .venv/bin/python benchmarks/bench_handoff.py --a BASE [--b .] [--rounds 3]

BASE: a checkout with its kernel built (as for bench_ab.py). Printed and saved to
benchmarks/out/bench_handoff.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

CASES = [
    (512, 384, 32),
    (512, 384, 8),
    (384, 512, 32),
    (384, 512, 8),
    (2048, 512, 32),
    (2048, 512, 8),
    (1152, 512, 1),
]

WORKER = r"""
import json, sys, time
import numpy as np
from engine.runtime import qlinear
kernel = qlinear._KERNEL
if kernel is None or not kernel.vnni_available():
    raise SystemExit("needs the kernel with AVX512-VNNI: " + qlinear.kernel_status())
rng = np.random.default_rng(0)
result = {}
for n, k, m in json.loads(sys.argv[1]):
    layer = qlinear.Linear.from_stored(
        rng.integers(-127, 128, (n, k), dtype=np.int8), rng.uniform(20, 200, n).astype(np.float32)
    )
    x = rng.standard_normal((m, k)).astype(np.float32)
    out = np.empty((m, n), np.float32)
    for _ in range(3000):
        kernel.linear(x, layer.packed, layer.scale, out, m, k, n, qlinear.MODE_INT8_VNNI, 2)
    batches = []
    for _ in range(20):
        start = time.perf_counter()
        for _ in range(200):
            kernel.linear(x, layer.packed, layer.scale, out, m, k, n, qlinear.MODE_INT8_VNNI, 2)
        batches.append((time.perf_counter() - start) / 200)
    result[f"{n}x{k} rows {m}"] = sorted(batches)
print(json.dumps(result))
"""


def run_worker(tree: Path) -> dict[str, list[float]]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.run(
        [sys.executable, "-c", WORKER, json.dumps(CASES)],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"the worker in {tree} failed:\n{proc.stderr.strip()}")
    result: dict[str, list[float]] = json.loads(proc.stdout)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", type=Path, required=True, help="the baseline checkout (its kernel built)")
    parser.add_argument("--b", type=Path, default=ROOT, help="the changed checkout (default: this one)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from benchmarks.common import machine, save_json, table

    trees = {"A": args.a.resolve(), "B": args.b.resolve()}
    for name, tree in trees.items():
        if not (tree / "engine" / "runtime").is_dir():
            raise SystemExit(f"--{name.lower()}: {tree} is not a checkout of this project")
    info = machine()
    print(f"# {info['cpu']}, {info['date_utc']} UTC, load {info['load_average_1_5_15']}, 2 threads")
    print(f"# A: {trees['A']}\n# B: {trees['B']}")
    runs: dict[str, list[dict[str, list[float]]]] = {"A": [], "B": []}
    for r in range(args.rounds):
        for name in ("A", "B") if r % 2 == 0 else ("B", "A"):
            runs[name].append(run_worker(trees[name]))
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    rows: list[list[Any]] = []
    results = []
    for case in runs["A"][0]:
        best = {name: min(run[case][0] for run in runs[name]) for name in runs}
        median = {
            name: statistics.median(statistics.median(run[case]) for run in runs[name]) for name in runs
        }
        results.append({"case": case, "best_s": best, "median_s": median})
        rows.append(
            [
                case,
                f"{best['A'] * 1e6:.2f}",
                f"{best['B'] * 1e6:.2f}",
                f"{median['A'] * 1e6:.2f}",
                f"{median['B'] * 1e6:.2f}",
                f"{median['A'] / median['B']:.2f}x",
            ]
        )
    print()
    print(table(["product", "A best us", "B best us", "A median us", "B median us", "A/B median"], rows))
    path = save_json(
        "bench_handoff",
        {
            "machine": info,
            "a": str(trees["A"]),
            "b": str(trees["B"]),
            "rounds": args.rounds,
            "results": results,
        },
    )
    print(f"saved {path}")


if __name__ == "__main__":
    main()
