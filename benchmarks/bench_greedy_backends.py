"""Greedy: which backend is faster, CTranslate2 or our decoder, per compute type and batch size.

The figures behind ``engine/runtime/backends.py``'s ``GREEDY_ON_DECODER`` table. One Engine on the
FLAN-T5-small-shaped demo model (random weights, bench_greedy.py's folders), 100-token prompts, 64
new tokens forced (min_new_tokens = max_new_tokens = 64), the engine's own thread layout. For each
compute type and batch size the two backends run interleaved round by round in one process:
CTranslate2's ``translate_batch`` (what the Engine calls for greedy) and our decoder's batch run to
completion (``decoder_batch.run_to_completion``), plain greedy and greedy with a repetition penalty.
Prints a table (medians, the ratio, the faster one) and the largest batch size up to which our
decoder wins, and saves benchmarks/out/bench_greedy_backends.json.

    .venv/bin/python benchmarks/bench_greedy_backends.py [--rounds 3] [--batches 1,2,4,8,16]
        [--compute-types int8,float32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_greedy import ensure_models  # noqa: E402
from benchmarks.common import interleaved, machine, save_json, table  # noqa: E402
from benchmarks.suite.contenders import forced_prompts  # noqa: E402
from engine.runtime.ct2 import DecodeOptions  # noqa: E402
from engine.runtime.decoder_batch import run_to_completion  # noqa: E402
from engine.runtime.engine import Engine  # noqa: E402
from engine.runtime.params import DecodingParams  # noqa: E402
from engine.runtime.result import GenerationRequest  # noqa: E402

NEW_TOKENS = 64
PROMPT_TOKENS = 100
VARIANTS: dict[str, dict[str, Any]] = {
    "greedy": {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS},
    "greedy + repetition_penalty 1.2": {
        "max_new_tokens": NEW_TOKENS,
        "min_new_tokens": NEW_TOKENS,
        "repetition_penalty": 1.2,
    },
}

HEADERS = ["compute", "variant", "batch", "ctranslate2 s", "decoder s", "ct2/decoder", "faster"]
KEYS = ["compute_type", "variant", "batch", "ctranslate2_s", "decoder_s", "ratio", "faster"]


def measure(engine: Engine, batch: int, raw: dict[str, Any], rounds: int) -> dict[str, float]:
    params = DecodingParams.from_dict(raw)
    prompts = forced_prompts(batch, PROMPT_TOKENS)
    requests = [GenerationRequest(tuple(p), params, i) for i, p in enumerate(prompts)]
    options = DecodeOptions.from_params(params)

    def ct2() -> None:
        hyps = engine.translator.translate(prompts, options)
        assert all(len(h.token_ids) == NEW_TOKENS for h in hyps)

    def decoder() -> None:
        results = run_to_completion(engine.decoder_batch(), requests)
        assert all(len(r.token_ids) == NEW_TOKENS for r in results)

    timings = interleaved({"ctranslate2": ct2, "decoder": decoder}, repeats=rounds)
    return {name: statistics.median(times) for name, times in timings.wall.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", default="1,2,4,8,16")
    parser.add_argument("--compute-types", default="int8,float32")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    folders = ensure_models()
    info = machine()
    print(
        f"# {info['cpu']}, {info['cores']} cores, load {info['load_average_1_5_15']}, {info['date_utc']} UTC"
    )
    rows, payload, crossover = [], [], {}
    for compute_type in args.compute_types.split(","):
        engine = Engine(folders[compute_type], compute_type=compute_type)
        plain_wins: list[bool] = []
        for name, raw in VARIANTS.items():
            for batch in batches:
                t = measure(engine, batch, raw, args.rounds)
                ratio = t["ctranslate2"] / t["decoder"]
                faster = "decoder" if ratio > 1 else "ctranslate2"
                if name == "greedy":
                    plain_wins.append(ratio > 1)
                row = [compute_type, name, batch, t["ctranslate2"], t["decoder"], round(ratio, 2), faster]
                rows.append(row)
                print(table(HEADERS, [row]).splitlines()[-1], flush=True)
                payload.append(dict(zip(KEYS, row, strict=True)))
        # The largest batch size up to which our decoder won at every size measured.
        wins_up_to = 0
        for batch, won in zip(batches, plain_wins, strict=True):
            if not won:
                break
            wins_up_to = batch
        crossover[compute_type] = wins_up_to
    print()
    print(table(HEADERS, rows))
    for compute_type, n in crossover.items():
        print(f"plain greedy, {compute_type}: our decoder faster up to batch {n} (0: never)")
    path = save_json(
        "bench_greedy_backends", {"machine": info, "rows": payload, "decoder_wins_up_to": crossover}
    )
    print(f"saved {path}")


if __name__ == "__main__":
    main()
