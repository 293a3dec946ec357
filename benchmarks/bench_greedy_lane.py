"""Greedy through the server on the continuous lane (our decoder's batch, rows join and leave
between steps) against the batch lane (one-shot batched calls: CTranslate2, or our decoder for up
to backends.GREEDY_ON_DECODER prompts), and contrastive search against greedy, at 1, 4 and 16
concurrent clients: the figures behind ``backends.GREEDY_CONTINUOUS`` and issue 15's "through the
server at 16 clients, contrastive tokens/s at least 0.7 of greedy's".

Two `engine serve` processes on the FLAN-T5-small-shaped demo model (random weights, int8, CPU):
``--greedy-lane batch`` and ``--greedy-lane continuous``; the suite's REST closed loop
(benchmarks/loadgen.py) sends ~100-token prompts asking for exactly 64 new tokens; each cell
runs in every round, cells interleaved, the idle server SIGSTOPped while the other is timed.
Prints tokens/s and p50/p90 latency per cell and the ratios (medians over rounds), and saves
benchmarks/out/bench_greedy_lane.json.

    .venv/bin/python benchmarks/bench_greedy_lane.py [--rounds 2] [--concurrency 1 4 16] [--requests 32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import machine, save_json, table  # noqa: E402
from benchmarks.suite.contenders import CellResult, Server  # noqa: E402
from benchmarks.suite.matrix import Target  # noqa: E402
from benchmarks.suite.workloads import ensure_models, make_prompts  # noqa: E402

NEW_TOKENS = 64
TARGET = Target("cpu-int8", "cpu", "int8", "int8")
STRATEGIES: dict[str, dict[str, Any]] = {
    "greedy": {},
    "contrastive": {"penalty_alpha": 0.6, "top_k": 4},
}
# (server, strategy): contrastive runs on the continuous lane whatever greedy_lane says, so it is
# timed on one server only.
CELLS = (("batch", "greedy"), ("continuous", "greedy"), ("continuous", "contrastive"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument(
        "--requests", type=int, default=32, help="requests per cell and round (at least 2x concurrency)"
    )
    p.add_argument("--prompt-tokens", type=int, default=100)
    args = p.parse_args()

    models = ensure_models("small", {"int8"})
    folder = models.folder("int8")
    prompts = make_prompts(folder, 16, args.prompt_tokens)
    print(f"starting two servers on {folder} ...", flush=True)
    servers = {
        lane: Server(folder, TARGET, extra_args=["--greedy-lane", lane]) for lane in ("batch", "continuous")
    }
    seen: dict[tuple[str, str, int], list[CellResult]] = {}
    try:
        for server in servers.values():
            server.pause()
        for rnd in range(args.rounds):
            for c in args.concurrency:
                requests = max(args.requests, 2 * c)
                for lane, strategy in CELLS:
                    params = {
                        "max_new_tokens": NEW_TOKENS,
                        "min_new_tokens": NEW_TOKENS,
                        **STRATEGIES[strategy],
                    }
                    server = servers[lane]
                    server.resume()
                    server.run(prompts, params, max(c, 4), c)  # warm-up: connections, first calls
                    result = server.run(prompts, params, requests, c)
                    server.pause()
                    if result.failures:
                        raise RuntimeError(f"{lane}/{strategy} c={c}: {result.failures[:3]}")
                    seen.setdefault((lane, strategy, c), []).append(result)
                    tps = result.new_tokens / result.duration_s
                    print(
                        f"round {rnd + 1} c={c:<3} {lane:>10} {strategy:<11} {tps:8.1f} tokens/s", flush=True
                    )
    finally:
        for server in servers.values():
            server.stop()

    rows, payload = [], []
    for (lane, strategy, c), results in sorted(seen.items(), key=lambda kv: (kv[0][2], kv[0][0], kv[0][1])):
        tps = statistics.median(r.new_tokens / r.duration_s for r in results)
        lat = sorted(x for r in results for x in r.latencies_s)
        p50, p90 = lat[len(lat) // 2], lat[min(len(lat) - 1, int(0.9 * len(lat)))]
        rows.append(
            [c, f"greedy_lane={lane}", strategy, f"{tps:.1f}", f"{p50 * 1000:.0f}", f"{p90 * 1000:.0f}"]
        )
        payload.append(
            {
                "concurrency": c,
                "greedy_lane": lane,
                "strategy": strategy,
                "tokens_per_s": tps,
                "p50_s": p50,
                "p90_s": p90,
                "rounds": [r.new_tokens / r.duration_s for r in results],
            }
        )
    print()
    print(table(["clients", "server", "strategy", "tokens/s", "p50 ms", "p90 ms"], rows))
    print()

    def per_round(a: tuple[str, str, int], b: tuple[str, str, int]) -> float:
        return statistics.median(
            (x.new_tokens / x.duration_s) / (y.new_tokens / y.duration_s)
            for x, y in zip(seen[a], seen[b], strict=True)
        )

    ratios = {}
    for c in args.concurrency:
        lane_ratio = per_round(("continuous", "greedy", c), ("batch", "greedy", c))
        cs_cont = per_round(("continuous", "contrastive", c), ("continuous", "greedy", c))
        cs_batch = per_round(("continuous", "contrastive", c), ("batch", "greedy", c))
        ratios[c] = {
            "continuous_vs_batch_greedy": lane_ratio,
            "contrastive_vs_greedy": cs_cont,
            "contrastive_vs_batch_lane_greedy": cs_batch,
        }
        print(f"c={c}: greedy tokens/s, continuous lane / batch lane: {lane_ratio:.2f}x")
        print(
            f"c={c}: contrastive tokens/s / greedy's (continuous lane): {cs_cont:.2f}"
            + (
                "  (issue 15 target >= 0.7: " + ("met" if cs_cont >= 0.7 else "NOT met") + ")"
                if c == 16
                else ""
            )
        )
        print(f"c={c}: contrastive tokens/s / greedy's (batch lane): {cs_batch:.2f}")
    path = save_json(
        "bench_greedy_lane", {"machine": machine(), "args": vars(args), "cells": payload, "ratios": ratios}
    )
    print(f"\nsaved {path}")


if __name__ == "__main__":
    main()
