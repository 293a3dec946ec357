"""The decoder's attention in the compiled kernel, as a step reads it: eight layers' cross-attention
and self-attention over separate keys and values (so that, from batch 8, they come from memory as
in a real step), at batch 8 and 16, one query row a sequence (greedy) and four (contrastive, k = 4).

FLAN-T5-small's shapes: 6 heads of 64, 100-token prompts (the cross-attention's keys), 40 cached
positions (the self-attention's). Each case is the median over --rounds of the best of --repeats
passes over the eight layers; the cases alternate within a round. To compare two builds, run it in
each checkout (bench_ab.py compares whole decoder calls).

    .venv/bin/python benchmarks/bench_attention.py [--rounds 15] [--repeats 3] [--threads 2]

Printed, and saved to benchmarks/out/bench_attention.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine, save_json, table  # noqa: E402
from engine.runtime import t5ops  # noqa: E402

HEADS, D_KV, PROMPT, CACHED, CAPACITY, LAYERS = 6, 64, 100, 40, 80, 8
CASES = [(8, 1), (8, 4), (16, 1), (16, 4)]  # (sequences, query rows a sequence)


class Case:
    """Eight layers' worth of keys and values for one (batch, rows) case."""

    def __init__(self, rng: np.random.Generator, batch: int, m: int) -> None:
        inner = HEADS * D_KV
        self.batch, self.m = batch, m

        def kv(width: int) -> list[np.ndarray]:
            return [rng.standard_normal((batch, HEADS, width, D_KV), dtype=np.float32) for _ in range(LAYERS)]

        self.cross_k, self.cross_v = kv(PROMPT), kv(PROMPT)
        self.self_k, self.self_v = kv(CAPACITY), kv(CAPACITY)
        self.bias = np.zeros((batch, PROMPT), np.float32)
        self.table = rng.standard_normal((CAPACITY + 1, HEADS), dtype=np.float32)
        self.lengths = np.full(batch, CACHED, np.int64)
        self.q = rng.standard_normal((batch * m, inner), dtype=np.float32)
        self.qkv = rng.standard_normal((batch * m, 3 * inner), dtype=np.float32)
        self.new_k = np.empty((batch, m, HEADS, D_KV), np.float32)
        self.new_v = np.empty_like(self.new_k)

    def cross(self, threads: int) -> float:
        start = time.perf_counter()
        for layer in range(LAYERS):
            t5ops.cross_attention(
                self.q, self.cross_k[layer], self.cross_v[layer], self.bias, m=self.m, threads=threads
            )
        return time.perf_counter() - start

    def self_attention(self, threads: int) -> float:
        start = time.perf_counter()
        for layer in range(LAYERS):
            t5ops.decoder_self_attention(
                self.qkv,
                self.self_k[layer],
                self.self_v[layer],
                self.lengths,
                self.table,
                self.new_k,
                self.new_v,
                rows=(self.batch, self.m),
                threads=threads,
            )
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not t5ops.available():
        raise SystemExit("needs the compiled kernel (python setup.py build_ext --inplace) on an AVX-512 CPU")
    rng = np.random.default_rng(0)
    cases = {key: Case(rng, *key) for key in CASES}
    times: dict[tuple[int, int, str], list[float]] = {
        (b, m, p): [] for b, m in CASES for p in ("cross", "self")
    }
    for _ in range(args.rounds):
        for (b, m), case in cases.items():
            times[(b, m, "cross")].append(min(case.cross(args.threads) for _ in range(args.repeats)))
            times[(b, m, "self")].append(min(case.self_attention(args.threads) for _ in range(args.repeats)))
    info = machine()
    rows = []
    for b, m in CASES:
        cross, own = (statistics.median(times[(b, m, p)]) for p in ("cross", "self"))
        rows.append([b, m, f"{cross * 1e3:.3f}", f"{own * 1e3:.3f}", f"{(cross + own) * 1e3:.3f}"])
    print(
        f"# {info['cpu']}, {info['date_utc']} UTC, load {info['load_average_1_5_15']}, {args.threads} threads"
    )
    print(
        f"# {LAYERS} layers, {HEADS} heads of {D_KV}, {PROMPT} prompt tokens, {CACHED} cached positions; "
        f"medians of {args.rounds} rounds, best of {args.repeats}"
    )
    print(table(["batch", "rows a sequence", "cross ms", "self ms", "step's attention ms"], rows))
    path = save_json(
        "bench_attention",
        {
            "machine": info,
            "threads": args.threads,
            "rounds": args.rounds,
            "repeats": args.repeats,
            "seconds": {f"b{b} m{m} {p}": v for (b, m, p), v in times.items()},
        },
    )
    print(f"saved {path}")


if __name__ == "__main__":
    main()
