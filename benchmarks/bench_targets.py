"""Issue 15's targets side by side in one run: greedy and contrastive search, ours against
Transformers fp32, ONNX Runtime int8 and CTranslate2 int8, batch 1 and 8, and the batch-1 step
against the weight-bandwidth floor.

FLAN-T5-small shapes, random weights (the int8 folder and the float32 checkpoint it was converted
from: benchmarks/bench_contrastive.py's models), a 100-token prompt per row, 64 new tokens forced
(min_new_tokens = max_new_tokens = 64), the same threads everywhere (--threads, default 2: our
kernel's OpenMP threads and CTranslate2's, torch's intra-op threads, ONNX Runtime's intra-op
threads). Rounds interleave every contender (the order rotates each round); medians over rounds,
and ratios as medians of per-round ratios.

Contenders:
  engine greedy / engine contrastive   Engine.generate_requests, the path the server takes (the
                                       engine picks the backend for greedy)
  our decoder greedy                   greedy on our own decoder (T5Runtime + the decoding loop)
  our decoder greedy, numpy layers     the same with t5_math.py's numpy attention/norms (the
                                       fused kernel functions off): what the fused path buys
  ctranslate2 int8 greedy              Translator.translate_batch directly
  transformers fp32 greedy/contrastive .venv-ref (4.55), a kept-alive subprocess
  onnxruntime int8 greedy              .venv-onnx (`make onnx`), optimum export + dynamic int8,
                                       its own KV-cached loop (benchmarks/onnx_timer.py)
Then the batch-1 step: our decoder's step + lm_head for one row (median of 64 steps) against
the bytes of weights it reads (as stored: int8) over the measured copy bandwidth.

    .venv/bin/python benchmarks/bench_targets.py [--rounds 3] [--batches 1,8] [--threads 2]

Printed, and saved to benchmarks/out/bench_targets.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ctranslate2  # noqa: E402

from benchmarks.common import OUT_DIR, machine  # noqa: E402
from benchmarks.suite.contenders import (  # noqa: E402
    ONNX_PYTHON,
    OnnxRuntimeTimer,
    TransformersTimer,
    ct2_greedy,
    forced_prompts,
    small_models,
)
from benchmarks.suite.machine import measure_bandwidth  # noqa: E402
from engine.runtime import qlinear  # noqa: E402
from engine.runtime.decoder_batch import run_on_decoder  # noqa: E402
from engine.runtime.engine import Engine  # noqa: E402
from engine.runtime.params import DecodingParams  # noqa: E402
from engine.runtime.result import GenerationRequest  # noqa: E402
from engine.runtime.t5 import T5Runtime  # noqa: E402

NEW_TOKENS = 64
PROMPT_TOKENS = 100
FORCED = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS}
GREEDY = dict(FORCED)
CONTRASTIVE = {"penalty_alpha": 0.6, "top_k": 4, **FORCED}
MODELS = OUT_DIR / "models"

ENGINE_GREEDY = "engine greedy"
SETTLE_S = 0.3
ENGINE_CONTRASTIVE = "engine contrastive"
OURS_GREEDY = "our decoder greedy"
OURS_GREEDY_NUMPY = "our decoder greedy, numpy layers"
OURS_CONTRASTIVE_NUMPY = "our decoder contrastive, numpy layers"
CT2 = "ctranslate2 int8 greedy"
HF_GREEDY = "transformers fp32 greedy"
HF_CONTRASTIVE = "transformers fp32 contrastive"
ORT = "onnxruntime int8 greedy"

# (what, numerator, denominator, target, "at least" or "at most", batches it applies to)
TARGETS: list[tuple[str, str, str, float, str, tuple[int, ...]]] = [
    ("greedy vs Transformers", HF_GREEDY, ENGINE_GREEDY, 6.0, ">=", (1,)),
    ("greedy vs Transformers", HF_GREEDY, ENGINE_GREEDY, 5.0, ">=", (8,)),
    ("greedy vs ONNX Runtime int8", ORT, ENGINE_GREEDY, 2.0, ">=", (1, 8)),
    ("contrastive vs Transformers", HF_CONTRASTIVE, ENGINE_CONTRASTIVE, 8.0, ">=", (1,)),
    ("contrastive vs Transformers", HF_CONTRASTIVE, ENGINE_CONTRASTIVE, 5.0, ">=", (8,)),
    ("contrastive time / our greedy's", ENGINE_CONTRASTIVE, ENGINE_GREEDY, 1.3, "<=", (8,)),
    # The same greedy targets for our decoder: what the engine's greedy would give on it
    # (backends.GREEDY_ON_DECODER decides which backend the engine uses).
    ("greedy on our decoder vs Transformers", HF_GREEDY, OURS_GREEDY, 6.0, ">=", (1,)),
    ("greedy on our decoder vs Transformers", HF_GREEDY, OURS_GREEDY, 5.0, ">=", (8,)),
    ("greedy on our decoder vs ONNX Runtime int8", ORT, OURS_GREEDY, 2.0, ">=", (1, 8)),
    ("contrastive time / greedy on our decoder's", ENGINE_CONTRASTIVE, OURS_GREEDY, 1.3, "<=", (8,)),
]


def timed(run: Callable[[], Any]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def forced_lengths(results: list[Any]) -> None:
    if not all(len(r.token_ids) == NEW_TOKENS for r in results):
        raise RuntimeError(f"a row did not get {NEW_TOKENS} tokens: {[len(r.token_ids) for r in results]}")


def step_floor(runtime: T5Runtime, prompt: list[int], gb_per_s: float) -> dict[str, float]:
    """Our decoder's batch-1 greedy step (decoder step + lm_head for one row), median of 64 steps,
    against the int8 weight bytes one step reads over ``gb_per_s``."""
    cache = runtime.new_cache([runtime.encode(prompt)], capacity=NEW_TOKENS + 1)
    token = np.array([[runtime.decoder_start_token_id]])
    times = []
    for _ in range(NEW_TOKENS):
        start = time.perf_counter()
        step = runtime.decoder_step(cache, token)
        logits = runtime.logits(step.hidden[:, 0])
        times.append(time.perf_counter() - start)
        cache.commit(step, np.zeros(1, dtype=np.int64))
        token = logits.argmax(axis=-1).reshape(1, 1)

    def size(w: Any) -> int:
        return int(w.stored.nbytes) if isinstance(w, qlinear.Linear) else int(w.nbytes)

    weights = sum(
        size(a)
        for layer in runtime.decoder
        for a in (layer.qkv, layer.self_out, layer.cross_q, layer.cross_out, layer.ffn.wi, layer.ffn.wo)
    )
    weights += size(runtime.lm_head)
    floor_ms = weights / (gb_per_s * 1e9) * 1e3
    step_ms = statistics.median(times) * 1e3
    return {
        "weight_mb": weights / 1e6,
        "floor_ms": floor_ms,
        "step_ms": step_ms,
        "step_over_floor": step_ms / floor_ms,
    }


def encoder_ms(runtime: T5Runtime, batch: list[list[int]]) -> dict[str, float]:
    """The encoder (+ cross K/V) for ``batch``, median of 5 each: as served (products on the kernel,
    attention fused), numpy layers on the kernel's products, and as before this work (numpy layers,
    OpenBLAS above 256 rows: the VNNI kernel's former limit)."""

    def median_ms() -> float:
        runtime.encode_batch(batch)
        return statistics.median(timed(lambda: runtime.encode_batch(batch)) for _ in range(5)) * 1e3

    out = {"fused": median_ms()}
    runtime.use_fused(False)
    out["numpy layers"] = median_ms()
    mode = runtime.weights.encoder[
        0
    ].qkv.mode  # the int8 products' mode in the encoder (VNNI: int8 activations)
    limit = qlinear.KERNEL_MAX_ROWS[mode]
    qlinear.KERNEL_MAX_ROWS[mode] = 256
    try:
        out["numpy layers, OpenBLAS above 256 rows"] = median_ms()
    finally:
        qlinear.KERNEL_MAX_ROWS[mode] = limit
        runtime.use_fused(True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--threads", type=int, default=2, help="threads of every contender")
    args = parser.parse_args()
    threads = args.threads
    batches = [int(b) for b in args.batches.split(",")]

    int8_dir, hf_dir = small_models()
    info = machine()
    engine = Engine(int8_dir, compute_type="int8", intra_threads=threads)  # CT2's and our decoder's
    runtime = T5Runtime.load(int8_dir, threads=threads)
    info["kernel"] = qlinear.kernel_status()
    info["fused_layers"] = runtime.fused
    vocab = json.loads((int8_dir / "shared_vocabulary.json").read_text())
    translator = ctranslate2.Translator(
        str(int8_dir), device="cpu", compute_type="int8", intra_threads=threads
    )
    hf = TransformersTimer(hf_dir, threads)
    ort = (
        OnnxRuntimeTimer(hf_dir, threads, MODELS / "onnx-contrastive-small")
        if ONNX_PYTHON.is_file()
        else None
    )
    info["transformers"] = hf.info["transformers"]
    info["onnxruntime"] = None if ort is None else {k: ort.info[k] for k in ("onnxruntime", "optimum_onnx")}
    greedy, contrastive = DecodingParams.from_dict(GREEDY), DecodingParams.from_dict(CONTRASTIVE)

    def engine_run(params: DecodingParams) -> Callable[[list[list[int]]], float]:
        def run(batch: list[list[int]]) -> float:
            requests = [GenerationRequest(tuple(ids), params) for ids in batch]
            start = time.perf_counter()
            results = engine.generate_requests(requests)
            seconds = time.perf_counter() - start
            forced_lengths(results)
            return seconds

        return run

    def ours(params: DecodingParams, fused: bool) -> Callable[[list[list[int]]], float]:
        def run(batch: list[list[int]]) -> float:
            runtime.use_fused(fused)
            requests = [GenerationRequest(tuple(ids), params) for ids in batch]
            start = time.perf_counter()
            results = run_on_decoder(runtime, requests)
            seconds = time.perf_counter() - start
            runtime.use_fused(True)
            forced_lengths(results)
            return seconds

        return run

    contenders: list[tuple[str, Callable[[list[list[int]]], float]]] = [
        (ENGINE_GREEDY, engine_run(greedy)),
        (ENGINE_CONTRASTIVE, engine_run(contrastive)),
        (OURS_GREEDY, ours(greedy, True)),
        (OURS_GREEDY_NUMPY, ours(greedy, False)),
        (OURS_CONTRASTIVE_NUMPY, ours(contrastive, False)),
        (CT2, lambda batch: ct2_greedy(translator, vocab, batch, NEW_TOKENS)),
        (HF_GREEDY, lambda batch: hf.time(batch, GREEDY)),
        (HF_CONTRASTIVE, lambda batch: hf.time(batch, CONTRASTIVE)),
    ]
    if ort is not None:
        contenders.append((ORT, lambda batch: ort.time(batch, GREEDY)))
    print(f"machine: {info}", flush=True)
    data = {b: forced_prompts(b, PROMPT_TOKENS) for b in batches}
    for _, run in contenders:  # warm-up, untimed (the ONNX export happens here on first use)
        run(data[batches[0]][:1])
    times: dict[tuple[str, int], list[float]] = defaultdict(list)
    try:
        for r in range(args.rounds):
            shift = r % len(contenders)
            for b in batches:
                for name, run in contenders[shift:] + contenders[:shift]:
                    # Transformers' and ONNX Runtime's thread pools spin for a while after a call
                    # (OpenMP's blocktime, ORT's spinning): the contender timed next would share
                    # the cores with them. A pause lets them go to sleep first.
                    time.sleep(SETTLE_S)
                    times[(name, b)].append(run(data[b]))
            print(f"round {r + 1}/{args.rounds} done", flush=True)
    finally:
        hf.close()
        if ort is not None:
            ort.close()
    bandwidth = measure_bandwidth().gb_per_s
    floor = step_floor(runtime, data[1][0], bandwidth)
    encoders = {b: encoder_ms(runtime, data[b]) for b in batches}

    def ratio(b: int, num: str, den: str) -> float:
        return statistics.median(n / d for n, d in zip(times[(num, b)], times[(den, b)], strict=True))

    print()
    print(
        f"median seconds per call ({NEW_TOKENS} new tokens per row, {PROMPT_TOKENS}-token prompts, {threads} threads)"
    )
    print(f"{'contender':<40}" + "".join(f"{f'batch {b}':>12}" for b in batches))
    for name, _ in contenders:
        print(f"{name:<40}" + "".join(f"{statistics.median(times[(name, b)]):>12.3f}" for b in batches))
    print()
    print("issue 15 targets (ratios: medians of per-round ratios)")
    checks = []
    for what, num, den, target, sense, applies in TARGETS:
        for b in applies:
            if (num, b) not in times or (den, b) not in times:
                print(f"  {what}, batch {b}: not measured ({num} or {den} missing)")
                continue
            value = ratio(b, num, den)
            ok = value >= target if sense == ">=" else value <= target
            checks.append(
                {"what": what, "batch": b, "ratio": value, "target": f"{sense} {target}", "met": ok}
            )
            print(
                f"  {what}, batch {b}: {value:.2f}x (target {sense} {target}x): {'met' if ok else 'NOT met'}"
            )
    for b in batches:
        print(
            f"  fused layers: numpy-layers / fused greedy time, batch {b}: {ratio(b, OURS_GREEDY_NUMPY, OURS_GREEDY):.2f}x"
        )
        print(
            f"  our decoder greedy vs engine greedy time, batch {b}: {ratio(b, OURS_GREEDY, ENGINE_GREEDY):.2f}x"
        )
    ok = floor["step_over_floor"] <= 1.5
    print(
        f"  batch-1 step: {floor['step_ms']:.2f} ms against the floor {floor['floor_ms']:.2f} ms "
        f"({floor['weight_mb']:.1f} MB int8 weights / {bandwidth:.1f} GB/s copy bandwidth) = "
        f"{floor['step_over_floor']:.2f}x (target <= 1.5x): {'met' if ok else 'NOT met'}"
    )
    for b, ms in encoders.items():
        print(
            f"  encoder, batch {b} ({b * PROMPT_TOKENS} rows), ms: "
            + ", ".join(f"{k} {v:.1f}" for k, v in ms.items())
        )
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    out = OUT_DIR / "bench_targets.json"
    out.write_text(
        json.dumps(
            {
                "machine": info,
                "command": "benchmarks/bench_targets.py " + " ".join(sys.argv[1:]),
                "rounds": args.rounds,
                "raw_seconds": {f"{name} b{b}": v for (name, b), v in times.items()},
                "checks": checks,
                "step_floor": {**floor, "bandwidth_gb_per_s": bandwidth},
                "encoder_ms": encoders,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"saved {out}")


if __name__ == "__main__":
    main()
