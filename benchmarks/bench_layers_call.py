"""A decoder step's layers in one kernel call (t5ops.decoder_layers) against one call a function
from Python (t5_fused.decoder_layer), side by side: greedy and contrastive search (alpha 0.6, k 4)
on our decoder at batch 1 and 8.

FLAN-T5-small shapes, random int8 weights (bench_targets.py's model), 100-token prompts, 64 new
tokens forced; the two settings alternate round by round in one process (medians), and the ids of
both are compared (the same functions in the same order: they must be equal).

    .venv/bin/python benchmarks/bench_layers_call.py [--rounds 5] [--threads 2]

Printed, and saved to benchmarks/out/bench_layers_call.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine, save_json, table  # noqa: E402
from benchmarks.suite.contenders import FORCED_STRATEGIES, forced_prompts, small_models  # noqa: E402
from engine.runtime import t5ops  # noqa: E402
from engine.runtime.decoder_batch import run_on_decoder  # noqa: E402
from engine.runtime.params import DecodingParams  # noqa: E402
from engine.runtime.result import GenerationRequest  # noqa: E402
from engine.runtime.t5 import T5Runtime  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not t5ops.layers_call_available():
        raise SystemExit(
            "needs the kernel built from this tree (decoder_layers): python setup.py build_ext --inplace"
        )
    model, _ = small_models()
    runtime = T5Runtime.load(model, threads=args.threads)
    info = machine()
    print(
        f"# {info['cpu']}, {info['date_utc']} UTC, load {info['load_average_1_5_15']}, {args.threads} threads"
    )
    results: list[dict[str, Any]] = []
    for name, raw in FORCED_STRATEGIES.items():
        params = DecodingParams.from_dict(raw)
        for batch in (1, 8):
            requests = [GenerationRequest(tuple(ids), params) for ids in forced_prompts(batch, 100)]
            times: dict[bool, list[float]] = {True: [], False: []}
            ids: dict[bool, list[tuple[int, ...]]] = {}
            run_on_decoder(runtime, requests)  # warm-up
            for _ in range(args.rounds):
                for on in (True, False):
                    runtime.use_layers_call(on)
                    start = time.perf_counter()
                    out = run_on_decoder(runtime, requests)
                    times[on].append(time.perf_counter() - start)
                    ids[on] = [tuple(r.token_ids) for r in out]
            runtime.use_layers_call(True)
            if ids[True] != ids[False]:
                raise SystemExit(
                    f"{name} batch {batch}: the one call gave other ids than the calls one by one"
                )
            one, each = statistics.median(times[True]), statistics.median(times[False])
            results.append({"strategy": name, "batch": batch, "one_call_s": one, "one_by_one_s": each})
            print(
                f"{name} batch {batch}: one call {one:.3f} s, one by one {each:.3f} s, same ids", flush=True
            )
    print()
    print(
        table(
            ["strategy", "batch", "one call s", "one by one s", "one by one / one call"],
            [
                [
                    r["strategy"],
                    r["batch"],
                    f"{r['one_call_s']:.3f}",
                    f"{r['one_by_one_s']:.3f}",
                    f"{r['one_by_one_s'] / r['one_call_s']:.2f}x",
                ]
                for r in results
            ],
        )
    )
    path = save_json(
        "bench_layers_call",
        {"machine": info, "threads": args.threads, "rounds": args.rounds, "results": results},
    )
    print(f"saved {path}")


if __name__ == "__main__":
    main()
