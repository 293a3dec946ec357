"""Issue 3's figures: our contrastive search against Transformers 4.55 and CTranslate2 int8 greedy.

FLAN-T5-small shapes (random weights, an int8 model folder; Transformers gets the same weights
from the float32 checkpoint they were converted from), k = 4, alpha = 0.6, a 100-token prompt,
64 new tokens forced (min_new_tokens = max_new_tokens = 64), batch 1 and 8, 2 threads everywhere.
Rounds interleave every contender (ours, Transformers in a persistent .venv-ref subprocess,
CTranslate2 greedy), medians over rounds. Then one instrumented pass per batch size times each
part of a step, and the bytes of weights one step reads are set against the measured memory
bandwidth (the floor). Printed, and saved to benchmarks/out/bench_contrastive.json.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python benchmarks/bench_contrastive.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ctranslate2  # noqa: E402
from threadpoolctl import threadpool_info, threadpool_limits  # noqa: E402

from benchmarks.common import OUT_DIR, machine  # noqa: E402
from benchmarks.suite.contenders import TransformersTimer, ct2_greedy, forced_prompts, small_models  # noqa: E402
from engine.runtime import decoder_batch, qlinear, t5_math  # noqa: E402
from engine.runtime.decoder_batch import DecoderBatch, run_on_decoder  # noqa: E402
from engine.runtime.params import DecodingParams  # noqa: E402
from engine.runtime.result import GenerationRequest  # noqa: E402
from engine.runtime.t5 import T5Runtime  # noqa: E402

THREADS = 2
NEW_TOKENS = 64
PROMPT_TOKENS = 100
PARAMS = {"penalty_alpha": 0.6, "top_k": 4, "max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS}
OURS = "ours contrastive (2 threads)"
OURS_1T = "ours contrastive (1 thread)"
OURS_NUMPY = "ours contrastive, numpy/OpenBLAS only (2 threads)"
OURS_VNNI = "ours contrastive, VNNI int16 activations instead of AMX (2 threads)"
HF = "transformers 4.55 contrastive (2 threads)"
GREEDY = "ctranslate2 int8 greedy (2 threads)"


def prompts(batch: int) -> list[list[int]]:
    return forced_prompts(batch, PROMPT_TOKENS)


def ours(runtime: T5Runtime, batch: list[list[int]]) -> float:
    params = DecodingParams.from_dict(PARAMS)
    start = time.perf_counter()
    results = run_on_decoder(runtime, [GenerationRequest(tuple(ids), params) for ids in batch])
    seconds = time.perf_counter() - start
    assert all(len(r.token_ids) == NEW_TOKENS for r in results)
    return seconds


# ---------------------------------------------------------------------- per-part breakdown
@contextmanager
def timed_parts(runtime: T5Runtime, seconds: dict[str, float]) -> Iterator[None]:
    """Wrap the runtime's step parts with timers (instance attributes shadow the methods; the
    math module's functions are replaced and put back)."""
    patched: list[tuple[Any, str, Any]] = []

    in_step = [False]  # the encoder calls feed_forward too: count decoder parts only inside a step

    def wrap(owner: Any, name: str, part: str, decoder_part: bool = False) -> None:
        inner: Callable[..., Any] = getattr(owner, name)
        if name == "decoder_step" and owner is t5_math:
            raise AssertionError("time the runtime's decoder_step, not the math's")

        def timed(*args: Any, **kwargs: Any) -> Any:
            if decoder_part and not in_step[0]:
                return inner(*args, **kwargs)
            start = time.perf_counter()
            if name == "decoder_step":
                in_step[0] = True
            try:
                return inner(*args, **kwargs)
            finally:
                in_step[0] = in_step[0] and name != "decoder_step"
                seconds[part] += time.perf_counter() - start

        original = owner.__dict__.get(name) if owner is not runtime else None
        patched.append((owner, name, original))
        # a static method stays one (DecoderBatch._candidates): else the instance would be passed
        setattr(owner, name, staticmethod(timed) if isinstance(original, staticmethod) else timed)

    wrap(runtime, "encode_batch", "encoder (+ cross K/V)")
    if not runtime.fused:  # on the kernel's path the layers run in one call: no parts to time
        wrap(t5_math, "self_attention", "self-attention (qkv, o)", decoder_part=True)
        wrap(t5_math, "cross_attention", "cross-attention (q, o)", decoder_part=True)
        wrap(t5_math, "feed_forward", "feed-forward", decoder_part=True)
    wrap(runtime, "logits", "lm_head")
    wrap(decoder_batch, "degeneration_penalty", "degeneration penalty")
    wrap(DecoderBatch, "_candidates", "processors + softmax + top-k")
    wrap(runtime, "decoder_step", "decoder step (total)")
    try:
        yield
    finally:
        for owner, name, original in reversed(patched):
            if owner is runtime:
                delattr(owner, name)
            else:
                setattr(owner, name, original)


def breakdown(runtime: T5Runtime, batch: list[list[int]]) -> dict[str, float]:
    seconds: dict[str, float] = defaultdict(float)
    with timed_parts(runtime, seconds):
        total = ours(runtime, batch)
    steps = NEW_TOKENS
    inside = sum(v for k, v in seconds.items() if k.startswith(("self-", "cross-", "feed-")))
    parts = {k: v * 1e3 / steps for k, v in seconds.items() if k != "encoder (+ cross K/V)"}
    rest = "norms, embeddings, Python" if inside else "one kernel call + embeddings, norm"
    parts[f"decoder step: {rest}"] = (seconds["decoder step (total)"] - inside) * 1e3 / steps
    outside = total - seconds["decoder step (total)"] - seconds["encoder (+ cross K/V)"]
    outside -= seconds["lm_head"] + seconds["degeneration penalty"] + seconds["processors + softmax + top-k"]
    parts["batch bookkeeping (commit, events, Python)"] = outside * 1e3 / steps
    parts["encoder (+ cross K/V), whole run ms"] = seconds["encoder (+ cross K/V)"] * 1e3
    parts["total ms per step (whole run / 64)"] = total * 1e3 / steps
    return parts


def bandwidth_gbs() -> tuple[float, float]:
    """(copy, read) GB/s on 512 MiB, past any cache: a numpy copy counts bytes read + written; the
    read figure is a one-row product with a [131072 x 1024] float32 matrix (a pure weight stream)."""
    a = np.ones(128 * 1024 * 1024, dtype=np.float32)
    b = np.empty_like(a)
    weights, row = a.reshape(-1, 1024), np.ones((1, 1024), dtype=np.float32)

    def best(run: Callable[[], object]) -> float:
        times = []
        for _ in range(5):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return min(times)

    return 2 * a.nbytes / best(lambda: np.copyto(b, a)) / 1e9, a.nbytes / best(lambda: row @ weights.T) / 1e9


def step_weight_bytes(runtime: T5Runtime, stored: bool) -> dict[str, int]:
    """Weights one contrastive step reads: every decoder weight except the cross-attention K/V
    projection (applied once per prompt), and the lm_head once; as stored (int8, what the
    small-batch kernel reads) or dequantized to float32 (what OpenBLAS reads)."""

    def size(layer: qlinear.Linear) -> int:
        return int(layer.stored.nbytes if stored else layer.dense.nbytes)

    decoder = 0
    for layer in runtime.decoder:
        arrays = (layer.qkv, layer.self_out, layer.cross_q, layer.cross_out, layer.ffn.wi, layer.ffn.wo)
        decoder += sum(size(a) for a in arrays)
    return {"decoder": decoder, "lm_head": size(runtime.lm_head)}


@contextmanager
def threads(runtime: T5Runtime, n: int) -> Iterator[None]:
    """n threads for OpenBLAS and for the compiled kernel."""
    before = runtime.threads
    runtime.threads = n
    try:
        with threadpool_limits(limits=n, user_api="blas"):
            yield
    finally:
        runtime.threads = before


@contextmanager
def vnni_not_amx() -> Iterator[None]:
    """The kernel as it was before AMX: int8 weights x int16 activations with VNNI."""
    before = qlinear._AMX
    qlinear._AMX = False
    try:
        yield
    finally:
        qlinear._AMX = before


@contextmanager
def numpy_only() -> Iterator[None]:
    """The runtime as it was before the compiled kernel: dequantized float32 weights, OpenBLAS
    with 2 threads."""
    kernel = qlinear._KERNEL
    qlinear._KERNEL = None
    try:
        with threadpool_limits(limits=THREADS, user_api="blas"):
            yield
    finally:
        qlinear._KERNEL = kernel


# ---------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", default="1,8")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    int8_dir, hf_dir = small_models()
    info = machine()
    runtime = T5Runtime.load(int8_dir, threads=THREADS)
    info["contrastive_kernel"] = qlinear.kernel_status()
    vocab = json.loads((int8_dir / "shared_vocabulary.json").read_text())
    translator = ctranslate2.Translator(
        str(int8_dir), device="cpu", compute_type="int8", intra_threads=THREADS
    )
    hf = TransformersTimer(hf_dir, THREADS)
    info["transformers_reference"] = hf.info["transformers"]
    # BLAS threads: the runtime's own policy (qlinear.single_threaded_blas); the numpy-only and
    # 1-thread contenders set theirs.
    with contextlib.nullcontext():
        info["blas"] = [
            {k: v for k, v in pool.items() if k in ("internal_api", "architecture", "num_threads", "version")}
            for pool in threadpool_info()
        ]
        print(f"machine: {info}", flush=True)

        data = {b: prompts(b) for b in batches}
        for b in batches:  # warm-up, untimed
            ours(runtime, data[b][:1])
            ct2_greedy(translator, vocab, data[b][:1], NEW_TOKENS)
        hf.time(data[1][:1], {**PARAMS, "max_new_tokens": 4, "min_new_tokens": 4})

        times: dict[tuple[str, int], list[float]] = defaultdict(list)

        def ours_one_thread(batch: list[list[int]]) -> float:
            # Threads spin-wait; on a machine busy with other work one thread can win.
            with threads(runtime, 1):
                return ours(runtime, batch)

        def ours_numpy(batch: list[list[int]]) -> float:
            with numpy_only():
                return ours(runtime, batch)

        def ours_vnni(batch: list[list[int]]) -> float:
            with vnni_not_amx():
                return ours(runtime, batch)

        contenders: list[tuple[str, Callable[[list[list[int]]], float]]] = [
            (OURS, lambda batch: ours(runtime, batch)),
            (OURS_1T, ours_one_thread),
            (OURS_NUMPY, ours_numpy),
            (HF, lambda batch: hf.time(batch, PARAMS)),
            (GREEDY, lambda batch: ct2_greedy(translator, vocab, batch, NEW_TOKENS)),
        ]
        if qlinear._AMX:  # side by side: the AMX kernel against the VNNI one it replaced
            contenders.append((OURS_VNNI, ours_vnni))
        for r in range(args.rounds):
            shift = r % len(contenders)
            order = contenders[shift:] + contenders[:shift]  # rotate who goes first
            for b in batches:
                for name, run in order:
                    times[(name, b)].append(run(data[b]))
            print(f"round {r + 1}/{args.rounds} done", flush=True)
        hf.close()

        parts = {(2, b): breakdown(runtime, data[b]) for b in batches}
        with threads(runtime, 1):
            parts.update({(1, b): breakdown(runtime, data[b]) for b in batches})
    with threadpool_limits(limits=THREADS, user_api="blas"):
        gbs, read_gbs = bandwidth_gbs()
    weights = step_weight_bytes(runtime, stored=True)
    weights_f32 = step_weight_bytes(runtime, stored=False)
    floor_ms = sum(weights.values()) / (gbs * 1e9) * 1e3
    floor_f32_ms = sum(weights_f32.values()) / (gbs * 1e9) * 1e3

    def ratio(b: int, num: str, den: str) -> float:
        return statistics.median(n / d for n, d in zip(times[(num, b)], times[(den, b)], strict=True))

    rows = []
    for b in batches:
        med = {name: statistics.median(times[(name, b)]) for name, _ in contenders}
        rows.append(
            {
                "batch": b,
                **{f"{k} s": v for k, v in med.items()},
                "HF / ours": ratio(b, HF, OURS),
                "HF / ours 1t": ratio(b, HF, OURS_1T),
                "numpy-only / ours": ratio(b, OURS_NUMPY, OURS),
                "ours / greedy": ratio(b, OURS, GREEDY),
                "ours 1t / greedy": ratio(b, OURS_1T, GREEDY),
                **({"VNNI / ours": ratio(b, OURS_VNNI, OURS)} if (OURS_VNNI, b) in times else {}),
            }
        )

    print()
    print("median seconds per run (64 new tokens per sequence); ratios are medians of per-round ratios")
    head = [
        "batch",
        "ours",
        "ours 1t",
        "numpy only",
        "HF 4.55",
        "CT2 greedy",
        "HF/ours",
        "HF/ours 1t",
        "numpy/ours",
        "ours/greedy",
        "1t/greedy",
    ]
    print("".join(f"{h:>12}" for h in head))
    for row in rows:
        cells = [f"{row['batch']}"] + [
            f"{row[f'{n} s']:.3f}" for n in (OURS, OURS_1T, OURS_NUMPY, HF, GREEDY)
        ]
        keys = ("HF / ours", "HF / ours 1t", "numpy-only / ours", "ours / greedy", "ours 1t / greedy")
        cells += [f"{row[k]:.2f}x" for k in keys]
        print("".join(f"{c:>12}" for c in cells))
        if "VNNI / ours" in row:
            print(
                f"{'':>12}  VNNI instead of AMX: {row[f'{OURS_VNNI} s']:.3f} s, VNNI / ours = {row['VNNI / ours']:.2f}x"
            )
    print()
    print("per step, ms (one instrumented run each; 64 steps; the decoder step's parts are inside its total)")
    columns = [(t, b) for t in (2, 1) for b in batches]
    print(f"{'part':<48}" + "".join(f"{f'b{b}, {t} thr':>12}" for t, b in columns))
    for name in parts[columns[0]]:
        print(f"{name:<48}" + "".join(f"{parts[c][name]:>12.2f}" for c in columns))
    print()
    print(
        f"floor: {sum(weights.values()) / 1e6:.1f} MB of weights per step as the kernel reads them "
        f"(decoder {weights['decoder'] / 1e6:.1f} MB + lm_head {weights['lm_head'] / 1e6:.1f} MB) / "
        f"{gbs:.1f} GB/s measured copy bandwidth = {floor_ms:.2f} ms per step; dequantized to float32 "
        f"(the numpy-only path) {sum(weights_f32.values()) / 1e6:.1f} MB = {floor_f32_ms:.2f} ms "
        f"(a one-row product streams weights at {read_gbs:.1f} GB/s)"
    )
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    out = OUT_DIR / "bench_contrastive.json"
    out.write_text(
        json.dumps(
            {
                "machine": info,
                "params": PARAMS,
                "prompt_tokens": PROMPT_TOKENS,
                "threads": THREADS,
                "rounds": args.rounds,
                "raw_seconds": {f"{name} b{b}": v for (name, b), v in times.items()},
                "table": rows,
                "parts_ms_per_step": {f"batch {b}, {t} threads": p for (t, b), p in parts.items()},
                "bandwidth_gbs": gbs,
                "read_bandwidth_gbs": read_gbs,
                "step_weight_bytes": weights,
                "floor_ms_per_step": floor_ms,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"saved {out}")


if __name__ == "__main__":
    main()
