"""Greedy decoding: the Engine (CTranslate2 int8 and float32) against Transformers fp32 (issue 2).

Same FLAN-T5-small-shaped random weights for everyone (``build_demo_model``, seed 0, written once
under benchmarks/out/models/), a prompt of about 100 tokens, 64 new tokens forced
(min_new_tokens = max_new_tokens = 64), batch 1 and 8, threads = cores. Contenders run in one
process, interleaved round by round; wall-time medians, CPU-time medians (steadier on a loaded
machine) and the median of per-round speedups are printed and saved to
benchmarks/out/bench_greedy.json. Targets: int8 >= 2.5x Transformers at batch 1, >= 2x at batch 8.

``--explore`` adds CTranslate2 variants (thread layouts, scores, compute types) used to decide
the engine's settings; they call CTranslate2 directly with the options the engine uses. The
engine's own layout (intra_threads 0 = automatic) is one single-threaded worker per core with
each batch split across the workers.

  .venv/bin/python benchmarks/bench_greedy.py [--repeats 5] [--batch-sizes 1 8] [--explore]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    OUT_DIR,
    Stats,
    cores,
    interleaved,
    machine,
    ratio_median,
    save_json,
    table,
)

MODELS = OUT_DIR / "models" / "demo-small-seed0"
BASELINE = "transformers fp32"


def ensure_models() -> dict[str, Path]:
    """The demo model's HF checkpoint and its int8 and float32 conversions (built once)."""
    from engine.model.convert import convert_checkpoint
    from engine.model.demo import build_demo_model

    paths = {"hf": MODELS / "hf", "int8": MODELS / "int8", "float32": MODELS / "float32"}
    if not (paths["int8"] / "engine.json").is_file() or not (paths["hf"] / "config.json").is_file():
        build_demo_model(
            paths["int8"], size="small", seed=0, quantization="int8", hf_output=paths["hf"], force=True
        )
    if not (paths["float32"] / "engine.json").is_file():
        convert_checkpoint(
            paths["hf"], paths["float32"], quantization="float32", random_weights=True, force=True
        )
    return paths


def corpus_lines() -> list[str]:
    text = (ROOT / "engine" / "model" / "data" / "demo_corpus.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if len(line.split()) >= 6]


def prompt_of(tokenize: Callable[[list[str]], list[tuple[int, ...]]], tokens: int, start: int = 0) -> str:
    """Corpus text of about ``tokens`` tokens (EOS included)."""
    words: list[str] = []
    for line in corpus_lines()[start:]:
        for word in line.split():
            words.append(word)
            if len(tokenize([" ".join(words)])[0]) >= tokens:
                return " ".join(words)
    raise RuntimeError("the demo corpus is too short for this prompt")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=100)
    parser.add_argument(
        "--threads", type=int, default=cores(), help="threads for every contender (default: cores)"
    )
    parser.add_argument("--explore", action="store_true", help="add CTranslate2 variants")
    parser.add_argument("--no-baseline", action="store_true", help="skip Transformers (for --explore)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)

    import ctranslate2
    import torch
    from transformers import T5ForConditionalGeneration

    from engine.runtime.ct2 import DecodeOptions
    from engine.runtime.engine import Engine
    from engine.runtime.params import DecodingParams
    from engine.runtime.result import GenerationRequest

    paths = ensure_models()
    torch.set_num_threads(args.threads)
    # The engine's automatic layout (intra_threads 0): one single-threaded worker per core.
    engines = {
        "engine int8": Engine(
            paths["int8"], compute_type="int8", inter_threads=args.threads, intra_threads=1
        ),
        "engine float32": Engine(
            paths["float32"], compute_type="float32", inter_threads=args.threads, intra_threads=1
        ),
    }
    int8 = engines["engine int8"]
    prompt = prompt_of(int8.tokenize, args.prompt_tokens)
    prompt_ids = int8.tokenize([prompt])[0]
    n = args.new_tokens
    params = {"max_new_tokens": n, "min_new_tokens": n}
    decoding = DecodingParams.from_dict(params)
    hf = None
    if not args.no_baseline:
        hf = T5ForConditionalGeneration.from_pretrained(paths["hf"], dtype=torch.float32).eval()

    report: dict[str, Any] = {
        "machine": machine(),
        "command": " ".join(["benchmarks/bench_greedy.py", *(argv if argv is not None else sys.argv[1:])]),
        "prompt_tokens": len(prompt_ids),
        "new_tokens": n,
        "threads": args.threads,
        "results": [],
    }
    rows: list[list[Any]] = []
    for batch in args.batch_sizes:
        contenders: dict[str, Callable[[], object]] = {}
        if hf is not None:
            input_ids = torch.tensor([list(prompt_ids)] * batch)

            def run_hf(x: Any = input_ids, b: int = batch) -> object:
                with torch.no_grad():
                    out = hf.generate(
                        input_ids=x,
                        attention_mask=torch.ones_like(x),
                        max_new_tokens=n,
                        min_new_tokens=n,
                        do_sample=False,
                        num_beams=1,
                    )
                assert out.shape == (b, n + 1), out.shape
                return out

            contenders[BASELINE] = run_hf
        for name, engine in engines.items():

            def run_engine(e: Engine = engine, b: int = batch) -> object:
                results = e.generate([prompt] * b, **params)
                assert all(len(r.token_ids) == n for r in results)
                return results

            contenders[name] = run_engine

        def run_streaming(e: Engine = int8, b: int = batch) -> object:
            # The server always streams: one Python callback per token and row.
            requests = [GenerationRequest(prompt_ids, decoding)] * b
            results = e.generate_requests(requests, lambda index, token_id: False)
            assert all(len(r.token_ids) == n for r in results)
            return results

        contenders["engine int8 + on_token"] = run_streaming
        if args.explore:
            contenders.update(
                explore_variants(
                    paths, prompt_ids, batch, n, args.threads, ctranslate2, DecodeOptions, DecodingParams
                )
            )
        timings = interleaved(contenders, repeats=args.repeats)
        times = timings.wall
        for name, t in times.items():
            stats = Stats.of(t)
            cpu = Stats.of(timings.cpu[name])
            speedup = ratio_median(times[BASELINE], t) if BASELINE in times else None
            report["results"].append(
                {
                    "batch": batch,
                    "contender": name,
                    "wall": stats,
                    "cpu": cpu,
                    "speedup": speedup,
                    "wall_s": t,
                    "cpu_s": timings.cpu[name],
                }
            )
            rows.append(
                [
                    batch,
                    name,
                    stats.median_s * 1000,
                    stats.median_s * 1000 / batch,
                    batch * n / stats.median_s,
                    cpu.median_s * 1000,
                    "" if speedup is None else f"{speedup:.2f}x",
                ]
            )
    report["int8_vs_float32"] = identical_share(engines["engine int8"], engines["engine float32"])
    headers = [
        "batch",
        "contender",
        "ms per call",
        "ms per request",
        "new tokens/s",
        "CPU ms per call",
        "speedup vs Transformers",
    ]
    print(json.dumps(report["machine"]))
    print(
        f"prompt {len(prompt_ids)} tokens, {n} new tokens forced, {args.threads} threads, {args.repeats} interleaved rounds"
    )
    print(table(headers, rows))
    share = report["int8_vs_float32"]
    print(
        f"int8 vs float32 greedy on these weights: {share['identical']}/{share['prompts']} sequences identical "
        f"({share['identical'] / share['prompts']:.0%}), {share['tokens']} new tokens each; "
        f"they agree on their first {share['common_prefix_tokens'] / share['prompts']:.1f} tokens on average"
    )
    print(f"saved {save_json('bench_greedy', report)}")
    return 0


def explore_variants(
    paths: dict[str, Path],
    prompt_ids: tuple[int, ...],
    batch: int,
    n: int,
    threads: int,
    ctranslate2: Any,
    decode_options: Any,
    decoding_params: Any,
) -> dict[str, Callable[[], object]]:
    vocab = json.loads((paths["int8"] / "shared_vocabulary.json").read_text())
    source = [[vocab[i] for i in prompt_ids]] * batch
    kwargs = decode_options.from_params(decoding_params(max_new_tokens=n, min_new_tokens=n)).kwargs()
    variants: dict[str, Callable[[], object]] = {}

    def add(name: str, translator: Any, **extra: Any) -> None:
        variants[name] = lambda: translator.translate_batch(source, **{**kwargs, **extra})

    def translator(compute_type: str, workers: int, per_worker: int) -> Any:
        return ctranslate2.Translator(
            str(paths["int8"]), compute_type=compute_type, inter_threads=workers, intra_threads=per_worker
        )

    one_worker = translator("int8", 1, threads)
    split = -(-batch // threads)
    add(f"ct2 int8, 1 worker x {threads} threads", one_worker)
    add(f"ct2 int8, 1 worker x {threads} threads, +scores", one_worker, return_scores=True)
    add("ct2 int8, 1 worker x 1 thread", translator("int8", 1, 1))
    add(
        f"ct2 int8, {threads} workers x 1 thread, split", translator("int8", threads, 1), max_batch_size=split
    )
    add(
        f"ct2 int16, {threads} workers x 1 thread, split",
        translator("int16", threads, 1),
        max_batch_size=split,
    )
    return variants


def identical_share(int8: Any, float32: Any, prompts: int = 16, tokens: int = 32) -> dict[str, int]:
    """How often int8 and float32 greedy agree, on 16 corpus lines (random weights are harsh on
    int8: their next-token distributions are flat, so small errors flip near-ties)."""
    lines = corpus_lines()[200 : 200 + prompts]
    a = int8.generate(lines, max_new_tokens=tokens)
    b = float32.generate(lines, max_new_tokens=tokens)
    same = sum(x.token_ids == y.token_ids for x, y in zip(a, b, strict=True))
    prefix = 0
    for x, y in zip(a, b, strict=True):
        common = 0
        for s, t in zip(x.token_ids, y.token_ids, strict=False):
            if s != t:
                break
            common += 1
        prefix += common
    return {"identical": same, "prompts": prompts, "tokens": tokens, "common_prefix_tokens": prefix}


if __name__ == "__main__":
    sys.exit(main())
