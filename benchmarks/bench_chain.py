"""The continuous loop's step chaining (``continuous_loop.CHAIN_S``) on and off, side by side:
JobService in this process with the real Engine on the FLAN-T5-small-shaped demo model (random
weights, int8, CPU), greedy on the continuous lane, ~100-token prompts, exactly 64 new tokens,
closed-loop clients that submit and wait. Each round runs both settings at each concurrency.
Prints tokens/s and saves benchmarks/out/bench_chain.json.

    .venv/bin/python benchmarks/bench_chain.py [--rounds 3] [--concurrency 1 16] [--requests 32]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import machine, save_json  # noqa: E402
from benchmarks.suite.workloads import ensure_models, make_prompts  # noqa: E402


async def tokens_per_s(engine: object, prompts: list[str], concurrency: int, requests: int) -> float:
    from engine.runtime.params import DecodingParams
    from harness.fakes import start_service

    params = DecodingParams(max_new_tokens=64, min_new_tokens=64)
    svc = await start_service(engine, greedy_lane="continuous")  # type: ignore[arg-type]

    async def client(first: int) -> None:
        for i in range(first, requests, concurrency):
            view = await svc.submit("bench", [prompts[i % len(prompts)]], params)
            await svc.wait("bench", view.job.id, 120)

    start = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(concurrency)))
    seconds = time.perf_counter() - start
    await svc.stop()
    return requests * 64 / seconds


def main() -> None:
    import engine.serving.continuous_loop as continuous_loop
    from engine.runtime.engine import Engine

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--requests", type=int, default=32)
    args = p.parse_args()
    folder = ensure_models("small", {"int8"}).folder("int8")
    engine = Engine(folder, device="cpu", compute_type="int8")
    prompts = [pr.text for pr in make_prompts(folder, 16, 100)]
    chained = continuous_loop.CHAIN_S
    seen: dict[tuple[int, float], list[float]] = {}
    for rnd in range(args.rounds):
        for c in args.concurrency:
            for chain in (0.0, chained):
                continuous_loop.CHAIN_S = chain
                tps = asyncio.run(tokens_per_s(engine, prompts, c, max(args.requests, 2 * c)))
                seen.setdefault((c, chain), []).append(tps)
                print(f"round {rnd + 1} c={c:<3} CHAIN_S={chain:<5} {tps:7.1f} tokens/s", flush=True)
    continuous_loop.CHAIN_S = chained
    ratios = {}
    for c in args.concurrency:
        ratio = statistics.median(a / b for a, b in zip(seen[(c, chained)], seen[(c, 0.0)], strict=True))
        ratios[c] = ratio
        print(f"c={c}: chained / one step per return, tokens/s: {ratio:.2f}x (median of per-round ratios)")
    path = save_json(
        "bench_chain",
        {
            "machine": machine(),
            "args": vars(args),
            "tokens_per_s": {f"{c}/{ch}": v for (c, ch), v in seen.items()},
            "ratios": ratios,
        },
    )
    print(f"saved {path}")


if __name__ == "__main__":
    main()
