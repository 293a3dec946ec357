"""A decoder step's products as a step reads them: every decoder layer's products in order, then the
lm_head, with the packed kernel's look-ahead (the later tiles of a group fetch the next group into
L2) on and off, side by side.

bench_qlinear.py repeats one product with its weights in cache (the arithmetic); here the weights of
FLAN-T5-small's whole decoder (22 MB of int8) and its lm_head (16 MB) pass once per round, more than
the last-level cache holds, so each product reads its weights from memory as in a real step. Rows:
1 and 8 (greedy at batch 1 and 8), 32 (contrastive, batch 8 x k = 4); the lm_head runs for at most 8
rows (contrastive computes it for the chosen candidates only). The two settings alternate round by
round in one process; medians over rounds. Then the layers' bytes as a single product (int8
activations, 43,008 x 512, four copies in turn so that each call reads its weights from memory):
what a step's 48 products cost beyond one product of the same size is their per-call work
(quantizing the activations, the pool's hand-off, wo's int16 activations, each product's first
group fetched without look-ahead); benchmarks/overlap_model.c models the tiles alone.

    .venv/bin/python benchmarks/bench_step_products.py [--rounds 40] [--threads 2]

Printed, and saved to benchmarks/out/bench_step_products.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine, save_json, table  # noqa: E402
from benchmarks.suite.contenders import small_models  # noqa: E402
from engine.runtime import qlinear  # noqa: E402
from engine.runtime.t5 import T5Runtime  # noqa: E402

ROWS = (1, 8, 32)


def one_product(kernel: Any, rng: np.random.Generator, rounds: int, threads: int) -> dict[int, float]:
    """The best seconds of one int8-activation product as large as the decoder's layers (43,008
    outputs x 512 inputs of int8 weights, 22 MB), by row count; four such products in turn, so that
    each call reads its weights from memory."""
    n, k = 43008, 512
    copies = [
        qlinear.Linear.from_stored(
            rng.integers(-127, 128, (n, k), dtype=np.int8), rng.uniform(20, 200, n).astype(np.float32)
        )
        for _ in range(4)
    ]
    best: dict[int, float] = {}
    for m in ROWS:
        x = rng.standard_normal((m, k), dtype=np.float32)
        out = np.empty((m, n), dtype=np.float32)
        times = []
        for r in range(max(rounds, 4)):
            layer = copies[r % len(copies)]
            assert layer.packed is not None and layer.scale is not None
            start = time.perf_counter()
            kernel.linear(x, layer.packed, layer.scale, out, m, k, n, qlinear.MODE_INT8_VNNI, threads)
            times.append(time.perf_counter() - start)
        best[m] = min(times)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    kernel = qlinear._KERNEL
    if kernel is None or not hasattr(kernel, "packed_ahead") or not kernel.vnni_available():
        raise SystemExit(
            f"needs the kernel with AVX512-VNNI, built from this tree; here: {qlinear.kernel_status()}"
        )
    model, _ = small_models()
    runtime = T5Runtime.load(model, threads=args.threads)
    layers = [
        w
        for layer in runtime.decoder
        for w in (layer.qkv, layer.self_out, layer.cross_q, layer.cross_out, layer.ffn.wi, layer.ffn.wo)
    ]
    assert all(isinstance(w, qlinear.Linear) for w in layers)
    info = machine()
    print(
        f"# {info['cpu']}, {info['date_utc']} UTC, load {info['load_average_1_5_15']}, {args.threads} threads"
    )
    rng = np.random.default_rng(0)
    results: list[dict[str, Any]] = []
    for m in ROWS:
        xs = {k: rng.standard_normal((m, k), dtype=np.float32) for k in {w.shape[1] for w in layers}}
        head_x = rng.standard_normal((min(m, 8), runtime.lm_head.shape[1]), dtype=np.float32)
        times: dict[tuple[bool, str], list[float]] = {
            (on, part): [] for on in (True, False) for part in ("layers", "lm_head")
        }
        for _ in range(args.rounds):
            for on in (True, False):
                kernel.packed_ahead(on)
                start = time.perf_counter()
                for w in layers:
                    w(xs[w.shape[1]], args.threads)
                mid = time.perf_counter()
                runtime.lm_head(head_x, args.threads)
                times[(on, "layers")].append(mid - start)
                times[(on, "lm_head")].append(time.perf_counter() - mid)
        kernel.packed_ahead(True)
        for part in ("layers", "lm_head"):
            ahead, plain = (statistics.median(times[(s, part)]) for s in (True, False))
            rows = head_x.shape[0] if part == "lm_head" else m
            results.append({"rows": rows, "part": part, "ahead_s": ahead, "no_ahead_s": plain})
            print(
                f"{part} rows {rows}: look-ahead {ahead * 1e6:.0f} us, without {plain * 1e6:.0f} us",
                flush=True,
            )
    one = one_product(kernel, rng, args.rounds, args.threads)
    print()
    print(
        table(
            ["part", "rows", "look-ahead us", "without us", "without / look-ahead"],
            [
                [
                    r["part"],
                    r["rows"],
                    f"{r['ahead_s'] * 1e6:.0f}",
                    f"{r['no_ahead_s'] * 1e6:.0f}",
                    f"{r['no_ahead_s'] / r['ahead_s']:.2f}x",
                ]
                for r in results
            ],
        )
    )
    for m, seconds in one.items():
        print(f"one 43008 x 512 product (the layers' 22 MB), rows {m}: {seconds * 1e6:.0f} us (best)")
    path = save_json(
        "bench_step_products",
        {
            "machine": info,
            "threads": args.threads,
            "rounds": args.rounds,
            "results": results,
            "one_product_best_s": one,
        },
    )
    print(f"saved {path}")


if __name__ == "__main__":
    main()
