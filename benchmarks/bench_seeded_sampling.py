"""Seeded sampling: on our decoder (now) against a fresh CTranslate2 Translator per request (before).

CTranslate2 seeds its generator once per worker thread, at the thread's first draw, so the engine
used to give each seeded request a fresh Translator: the model loaded again per request, one
request at a time. Seeded requests now run on our KV-cached decoder with a generator of their own,
in one continuous batch. This script times both routes side by side, plus CTranslate2's unseeded
sampling on the loaded model (what a request without a seed costs), all in one process, rounds
interleaved. FLAN-T5-small shapes, the int8 demo folder, 100-token prompts, 64 new tokens forced,
temperature 1, top_k 50; one request, then 8 requests at once. Printed and saved to
benchmarks/out/bench_seeded_sampling.json.

    .venv/bin/python benchmarks/bench_seeded_sampling.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ctranslate2  # noqa: E402

from benchmarks.common import interleaved, machine, ratio_median, save_json, table  # noqa: E402
from benchmarks.suite.contenders import forced_prompts, small_models  # noqa: E402
from engine.runtime.engine import Engine  # noqa: E402
from engine.runtime.params import DecodingParams  # noqa: E402
from engine.runtime.result import GenerationRequest  # noqa: E402

NEW_TOKENS = 64
PROMPT_TOKENS = 100
SAMPLING = {
    "do_sample": True,
    "temperature": 1.0,
    "top_k": 50,
    "max_new_tokens": NEW_TOKENS,
    "min_new_tokens": NEW_TOKENS,
}
OURS = "seeded, our decoder (now)"
FRESH = "seeded, fresh Translator per request (before)"
UNSEEDED = "unseeded, CTranslate2 (loaded)"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    folder, _ = small_models()
    engine = Engine(folder)
    vocab = json.loads((folder / "shared_vocabulary.json").read_text())
    workers, threads = engine.translator.inter_threads, engine.translator.intra_threads

    def ours(batch: list[list[int]], seed: int) -> None:
        requests = [
            GenerationRequest(tuple(ids), DecodingParams.from_dict({**SAMPLING, "seed": seed + i}))
            for i, ids in enumerate(batch)
        ]
        assert all(len(r.token_ids) == NEW_TOKENS for r in engine.generate_requests(requests))

    def fresh_translator(batch: list[list[int]], seed: int) -> None:
        """The old route, as engine/runtime/ct2.py ran it: a new Translator per seeded request."""
        for i, ids in enumerate(batch):
            ctranslate2.set_random_seed(seed + i)
            translator = ctranslate2.Translator(
                str(folder), device="cpu", compute_type="int8", inter_threads=workers, intra_threads=threads
            )
            out = translator.translate_batch(
                [[vocab[t] for t in ids]],
                beam_size=1,
                sampling_topk=50,
                max_decoding_length=NEW_TOKENS,
                min_decoding_length=NEW_TOKENS,
            )
            assert len(out[0].hypotheses[0]) == NEW_TOKENS

    def unseeded(batch: list[list[int]]) -> None:
        translator = engine.translator._translator
        out = translator.translate_batch(
            [[vocab[t] for t in ids] for ids in batch],
            beam_size=1,
            sampling_topk=50,
            max_decoding_length=NEW_TOKENS,
            min_decoding_length=NEW_TOKENS,
        )
        assert all(len(r.hypotheses[0]) == NEW_TOKENS for r in out)

    batches: dict[str, object] = {}
    report: dict[str, object] = {"machine": machine(), "batches": batches}
    print(json.dumps(report["machine"]))
    rows = []
    for size in (1, 8):
        batch = forced_prompts(size, PROMPT_TOKENS)
        timings = interleaved(
            {
                OURS: functools.partial(ours, batch, 100),
                FRESH: functools.partial(fresh_translator, batch, 100),
                UNSEEDED: functools.partial(unseeded, batch),
            },
            repeats=args.repeats,
        )
        medians = {name: statistics.median(t) for name, t in timings.wall.items()}
        speedup = ratio_median(timings.wall[FRESH], timings.wall[OURS])
        rows.append([size, medians[OURS], medians[FRESH], medians[UNSEEDED], f"{speedup:.2f}x"])
        batches[str(size)] = {"wall": timings.wall, "medians": medians, "fresh_over_ours": speedup}
        print(f"batch {size} done", flush=True)
    print()
    print(
        table(
            ["requests", "ours s", "fresh Translator s", "unseeded CT2 s", "before / now"],
            rows,
        )
    )
    print(f"\nsaved {save_json('bench_seeded_sampling', report)}")


if __name__ == "__main__":
    main()
