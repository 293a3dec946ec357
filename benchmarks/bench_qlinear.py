"""The int8 products of the compiled kernel side by side: int16 activations (mode 2, VPDPWSSD) against
int8 activations (mode 4, VPDPBUSD), both on weights packed in AMX's layout, on FLAN-T5-small's weight
shapes and the row counts our runtime multiplies: 1 and 8 (greedy decoder steps at batch 1 and
8), 4 and 32 (contrastive, k = 4), 100 and 800 (the encoder of 1 and 8 100-token prompts).

Random int8 weights and float32 activations; the same packed weights in both modes (packed once,
as qlinear.Linear does, 64-byte aligned); the two modes alternate round by round in one process,
best of the rounds (the machine is shared: the minimum is the steadiest figure). Weights stay in
cache between repeats, so small row counts here show the compute side, not a decoder step's
memory-bound reads. Needs AVX512-VNNI.

    .venv/bin/python benchmarks/bench_qlinear.py [--threads 2] [--rounds 5]

Printed, and saved to benchmarks/out/bench_qlinear.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine, save_json, table  # noqa: E402
from engine.runtime import qlinear  # noqa: E402
from engine.runtime.qlinear import MODE_INT8_INT16, MODE_INT8_VNNI  # noqa: E402

# (outputs, inputs) of FLAN-T5-small's products: fused Q/K/V, the attention outputs (self and
# cross), the cross-attention's Q, gated wi, wo, lm_head (last: it runs for at most 32 rows)
SHAPES = [(1152, 512), (512, 384), (384, 512), (2048, 512), (512, 1024), (32128, 512)]
ROWS = [1, 4, 8, 32, 100, 800]


def seconds_per_call(
    kernel: Any, x: np.ndarray, weights: np.ndarray, scale: np.ndarray, n: int, mode: int, threads: int
) -> float:
    """One round of x [m, k] by the weights (n outputs) in ``mode``: enough repeats for about 1e8
    multiply-adds, seconds per call."""
    m, k = x.shape
    out = np.empty((m, n), dtype=np.float32)
    repeats = min(200, max(3, int(1e8 // (m * n * k))))
    start = time.perf_counter()
    for _ in range(repeats):
        kernel.linear(x, weights, scale, out, m, k, n, mode, threads)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    kernel = qlinear._KERNEL
    if kernel is None or not kernel.vnni_available():
        raise SystemExit(f"needs the kernel with AVX512-VNNI; here: {qlinear.kernel_status()}")
    info = machine()
    print(
        f"# {info['cpu']}, {info['date_utc']} UTC, load {info['load_average_1_5_15']}, {args.threads} threads"
    )
    rng = np.random.default_rng(0)
    rows_out, payload = [], []
    for n, k in SHAPES:
        stored = rng.integers(-127, 128, (n, k), dtype=np.int8)
        layer = qlinear.Linear.from_stored(stored, rng.uniform(20, 200, n).astype(np.float32))
        assert layer.packed is not None and layer.scale is not None
        for m in ROWS:
            if (n, k) == SHAPES[-1] and m > 32:  # the lm_head runs for at most B x k rows
                continue
            x = rng.standard_normal((m, k)).astype(np.float32)
            times: dict[int, list[float]] = {MODE_INT8_INT16: [], MODE_INT8_VNNI: []}
            for _ in range(args.rounds):
                for mode, weights in ((MODE_INT8_INT16, layer.packed), (MODE_INT8_VNNI, layer.packed)):
                    times[mode].append(
                        seconds_per_call(kernel, x, weights, layer.scale, n, mode, args.threads)
                    )
            int16, int8 = min(times[MODE_INT8_INT16]), min(times[MODE_INT8_VNNI])
            row = [m, f"{n} x {k}", f"{int16 * 1e6:.1f}", f"{int8 * 1e6:.1f}", f"{int16 / int8:.2f}x"]
            row.append(f"{2 * m * n * k / int8 / 1e9:.0f}")
            rows_out.append(row)
            payload.append({"rows": m, "n": n, "k": k, "int16_s": int16, "int8_s": int8})
            print(" ".join(str(c) for c in row), flush=True)
    headers = ["rows", "weights N x K", "int16 us", "int8 us", "int16 / int8", "int8 GOP/s"]
    print()
    print(table(headers, rows_out))
    path = save_json("bench_qlinear", {"machine": info, "threads": args.threads, "rows": payload})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
