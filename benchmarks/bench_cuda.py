"""CUDA figures: our CuPy contrastive decoder against Transformers 4.55 contrastive and CTranslate2
greedy on the same GPU, FLAN-T5 shapes (random weights, float16), k = 4, alpha = 0.6, a 100-token
prompt, 64 new tokens forced. Rounds interleave the contenders; medians over rounds. Our decoder's
time is split into encoder, decoder step, lm_head and the rest (selection on the host, transfers).

    python benchmarks/bench_cuda.py [--sizes small,base] [--batches 1,8,16] [--rounds 3]
        [--hf-python PYTHON]   # a Python whose transformers is 4.55.x (contrastive search)

Printed, and saved as JSON (benchmarks/out/bench_cuda.json, or --out).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ctranslate2  # noqa: E402

from benchmarks.common import OUT_DIR, machine  # noqa: E402
from benchmarks.suite.contenders import TransformersTimer, ct2_greedy, forced_prompts  # noqa: E402
from engine.model.demo import build_demo_model  # noqa: E402
from engine.runtime.decoder_batch import run_on_decoder  # noqa: E402
from engine.runtime.params import DecodingParams  # noqa: E402
from engine.runtime.result import GenerationRequest  # noqa: E402
from engine.runtime.t5 import T5Runtime  # noqa: E402

NEW_TOKENS = 64
PROMPT_TOKENS = 100
CONTRASTIVE = {"penalty_alpha": 0.6, "top_k": 4, "max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS}
GREEDY = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS}
OURS = "ours contrastive (CuPy float16, CUDA graphs)"
OURS_EAGER = "ours contrastive (CuPy float16, eager)"
OURS_GREEDY = "ours greedy (CuPy float16, CUDA graphs)"
HF = "transformers 4.55 contrastive (float16)"
CT2 = "ctranslate2 greedy (float16)"


def prompts(batch: int) -> list[list[int]]:
    return forced_prompts(batch, PROMPT_TOKENS)


def models(size: str) -> tuple[Path, Path]:
    folder, hf = OUT_DIR / "models" / f"cuda-{size}-float16", OUT_DIR / "models" / f"cuda-{size}-hf"
    if not (folder / "engine.json").is_file() or not (hf / "model.safetensors").is_file():
        build_demo_model(folder, size=size, seed=0, quantization="float16", hf_output=hf, force=True)
    return folder, hf


def sync() -> None:
    import cupy

    cupy.cuda.Device().synchronize()


def ours(runtime: T5Runtime, batch: list[list[int]], raw: dict[str, Any]) -> float:
    params = DecodingParams.from_dict(raw)
    sync()
    start = time.perf_counter()
    results = run_on_decoder(runtime, [GenerationRequest(tuple(ids), params) for ids in batch])
    sync()
    seconds = time.perf_counter() - start
    assert all(len(r.token_ids) == NEW_TOKENS for r in results)
    return seconds


def breakdown(runtime: T5Runtime, batch: list[list[int]]) -> dict[str, float]:
    """One contrastive run with a device sync around each part: seconds per part (the syncs add a
    little time of their own, so the parts sum to a bit more than a plain run)."""
    seconds = {"encoder": 0.0, "decoder step": 0.0, "lm_head": 0.0}
    originals: dict[str, Callable[..., Any]] = {}

    def wrap(name: str, part: str) -> None:
        fn = getattr(runtime, name)
        originals[name] = fn

        def timed(*args: Any, **kwargs: Any) -> Any:
            sync()
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            sync()
            seconds[part] += time.perf_counter() - start
            return out

        setattr(runtime, name, timed)

    wrap("encode_batch", "encoder")
    wrap("decoder_step", "decoder step")
    wrap("logits", "lm_head")
    try:
        total = ours(runtime, batch, CONTRASTIVE)
    finally:
        for name in originals:
            delattr(runtime, name)
    seconds["selection, transfers, Python"] = total - sum(seconds.values())
    seconds["total"] = total
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="small,base")
    parser.add_argument("--batches", default="1,8,16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--hf-python", default="", help="a Python with transformers 4.55.x (skipped if empty)"
    )
    parser.add_argument("--out", type=Path, default=OUT_DIR / "bench_cuda.json")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    report: dict[str, Any] = {"machine": machine(), "sizes": {}}
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(0)
    report["machine"]["gpu"] = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    print(json.dumps(report["machine"]), flush=True)
    for size in args.sizes.split(","):
        folder, hf_dir = models(size)
        runtime = T5Runtime.load(folder, device="cuda", dtype="float16")
        runtime.use_cuda_graphs(True)
        eager = T5Runtime.load(folder, device="cuda", dtype="float16")
        eager.use_cuda_graphs(False)
        translator = ctranslate2.Translator(str(folder), device="cuda", compute_type="float16")
        vocab = json.loads((folder / "shared_vocabulary.json").read_text())
        hf = (
            TransformersTimer(hf_dir, 4, "cuda", "float16", python=Path(args.hf_python))
            if args.hf_python
            else None
        )
        contenders: dict[str, Callable[[list[list[int]]], float]] = {
            OURS: functools.partial(ours, runtime, raw=CONTRASTIVE),
            OURS_EAGER: functools.partial(ours, eager, raw=CONTRASTIVE),
            OURS_GREEDY: functools.partial(ours, runtime, raw=GREEDY),
            CT2: functools.partial(ct2_greedy, translator, vocab, new_tokens=NEW_TOKENS),
        }
        if hf is not None:
            contenders[HF] = functools.partial(hf.time, params=CONTRASTIVE)
        times: dict[str, dict[int, list[float]]] = {name: {b: [] for b in batches} for name in contenders}
        for b in batches:  # warm-up: kernels compiled, caches and pools filled
            for run in contenders.values():
                run(prompts(b))
        for r in range(args.rounds):
            for b in batches:
                for name, run in contenders.items():
                    times[name][b].append(run(prompts(b)))
            print(f"{size}: round {r + 1}/{args.rounds} done", flush=True)
        medians = {name: {b: statistics.median(t[b]) for b in batches} for name, t in times.items()}
        parts = {b: breakdown(runtime, prompts(b)) for b in batches}
        eager_parts = {b: breakdown(eager, prompts(b)) for b in batches}
        report["sizes"][size] = {
            "seconds": times,
            "medians": medians,
            "breakdown": parts,
            "breakdown_eager": eager_parts,
            "graphs": runtime.graph_status(),
        }
        if hf is not None:
            report["transformers"] = hf.info.get("transformers")
            hf.close()
        print(
            f"\n{size}: medians over {args.rounds} rounds, {NEW_TOKENS} new tokens, {PROMPT_TOKENS}-token prompts"
        )
        print(f"{'contender':44s}" + "".join(f"{'b' + str(b):>10s}" for b in batches))
        for name in contenders:
            print(f"{name:44s}" + "".join(f"{medians[name][b]:9.3f}s" for b in batches))
        print(f"CUDA graphs: {runtime.graph_status()}")
        for label, num, den in (
            ("Transformers / ours", HF, OURS),
            ("eager / graphs", OURS_EAGER, OURS),
            ("ours / CTranslate2 greedy", OURS, CT2),
        ):
            if num in medians and den in medians:
                print(f"{label:44s}" + "".join(f"{medians[num][b] / medians[den][b]:9.2f}x" for b in batches))
        for title, table in (("graphs", parts), ("eager", eager_parts)):
            print(f"per step of our contrastive run, {title} (ms, with a sync around each part):")
            for part in table[batches[0]]:
                print(
                    f"  {part:42s}" + "".join(f"{table[b][part] * 1000 / NEW_TOKENS:9.2f} " for b in batches)
                )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
