"""The kernel's pool (engine/runtime/_pool.c: the caller does the work of a thread that is not on a
core) against OpenMP's threads for the same tasks, side by side in one process: our decoder's
greedy and contrastive search (k=4) on the FLAN-T5-small-shaped demo model (random weights, int8,
2 threads), 100-token prompts, 64 new tokens, batch 1 and 8; rounds alternate the two. With
``--hogs N`` N busy processes share the cores meanwhile (a loaded machine, or a container at its
CPU quota). Prints min/median ms per call and saves benchmarks/out/bench_pool.json.

    .venv/bin/python benchmarks/bench_pool.py [--rounds 5] [--hogs 0]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import machine, save_json  # noqa: E402
from benchmarks.suite.workloads import ensure_models  # noqa: E402


def main() -> None:
    from engine.runtime import qlinear
    from engine.runtime.decoder_batch import run_on_decoder
    from engine.runtime.params import DecodingParams
    from engine.runtime.result import GenerationRequest
    from engine.runtime.t5 import T5Runtime

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--hogs", type=int, default=0, help="busy processes running meanwhile")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    kernel = qlinear._KERNEL
    if kernel is None or not hasattr(kernel, "pool_openmp"):
        raise SystemExit(f"the kernel's pool is not built here: {qlinear.kernel_status()}")
    if kernel.amx_available():
        raise SystemExit("with AMX the kernel's threads are OpenMP's only (tiles are configured per thread)")
    runtime = T5Runtime.load(ensure_models("small", {"int8"}).folder("int8"), threads=args.threads)
    rng = np.random.default_rng(1)
    cells = {}
    for batch in (1, 8):
        for name, extra in (("greedy", {}), ("contrastive", {"penalty_alpha": 0.6, "top_k": 4})):
            params = DecodingParams.from_dict({"max_new_tokens": 64, "min_new_tokens": 64, **extra})
            ids = [(*(int(x) for x in rng.integers(3, 30000, 99)), 1) for _ in range(batch)]
            cells[(name, batch)] = [GenerationRequest(i, params) for i in ids]
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.hogs)]
    times: dict[tuple[str, str, int], list[float]] = {}
    try:
        for executor in ("pool", "openmp"):  # warm-up
            kernel.pool_openmp(executor == "openmp")
            for requests in cells.values():
                run_on_decoder(runtime, requests)
        for rnd in range(args.rounds):
            for executor in ("pool", "openmp") if rnd % 2 == 0 else ("openmp", "pool"):
                kernel.pool_openmp(executor == "openmp")
                for (name, batch), requests in cells.items():
                    start = time.perf_counter()
                    run_on_decoder(runtime, requests)
                    times.setdefault((executor, name, batch), []).append(time.perf_counter() - start)
            print(f"round {rnd + 1}/{args.rounds} done", flush=True)
    finally:
        kernel.pool_openmp(False)
        for hog in hogs:
            hog.kill()
    print(
        f"\nms per call, min / median over {args.rounds} rounds ({args.threads} threads, {args.hogs} busy processes)"
    )
    rows = {}
    for name, batch in cells:
        line = [f"{name:<12} batch {batch}"]
        for executor in ("pool", "openmp"):
            t = times[(executor, name, batch)]
            line.append(f"{executor} {min(t) * 1000:7.1f} / {statistics.median(t) * 1000:7.1f}")
        ratio = statistics.median(times[("openmp", name, batch)]) / statistics.median(
            times[("pool", name, batch)]
        )
        rows[f"{name}/{batch}"] = {
            "pool": times[("pool", name, batch)],
            "openmp": times[("openmp", name, batch)],
        }
        print("  ".join(line) + f"  openmp/pool median {ratio:.2f}x")
    path = save_json("bench_pool", {"machine": machine(), "args": vars(args), "seconds": rows})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
