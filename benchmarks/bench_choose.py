"""Contrastive search's candidates, numpy against the compiled kernel, side by side
(engine/runtime/choose_ops.py, _choose.c; issue 15).

  per row        one row of float32 logits (FLAN-T5's 32,128 entries) to its top k and their
                 probabilities: choosers.softmax_rows + top_k (numpy: the whole softmax, then k
                 argmax passes) against choose_ops.top_k_softmax, k = 4 and 8; microseconds a row,
                 median of interleaved rounds, each a number of passes over the same 8 random rows
                 (a batch-8 step's logits: 1 MB, in cache as after the step's lm_head; both give
                 the same ids: checked);
  penalty        contrastive's degeneration penalty (the max cosine of 4 candidates with 33 of a
                 65-position context, batch 8 and 16): choosers.degeneration_penalty on numpy
                 against choose_ops.degeneration_penalty, microseconds a call, with the context in
                 cache and cold (40 MB written between calls, as a step's layers leave it; the
                 writing is not timed); both within float32 rounding: checked;
  our decoder    run_on_decoder, contrastive search (alpha 0.6, k 4) at batch 8 with 64 forced new
                 tokens on FLAN-T5-small's shapes, int8 (bench_targets.py's model and prompts),
                 with the chooser on numpy and on the kernel (the same ids: checked), and greedy on
                 our decoder for issue 15's ratio (contrastive at most 1.3x greedy's time).

Printed, and saved to benchmarks/out/bench_choose.json.

    .venv/bin/python benchmarks/bench_choose.py [--rows 8] [--passes 25] [--repeats 9] [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_targets import CONTRASTIVE, GREEDY, NEW_TOKENS, PROMPT_TOKENS  # noqa: E402
from benchmarks.common import interleaved, machine, ratio_median, save_json, table  # noqa: E402
from benchmarks.suite.contenders import forced_prompts, small_models  # noqa: E402
from engine.runtime import choose_ops, qlinear  # noqa: E402
from engine.runtime.choosers import degeneration_penalty, softmax_rows, top_k  # noqa: E402
from engine.runtime.decoder_batch import run_on_decoder  # noqa: E402
from engine.runtime.params import DecodingParams  # noqa: E402
from engine.runtime.result import GenerationRequest  # noqa: E402
from engine.runtime.t5 import T5Runtime  # noqa: E402

VOCAB = 32128
BATCH = 8
NUMPY, KERNEL = "numpy", "kernel"
DECODER_CONTENDERS = ("contrastive, numpy candidates", "contrastive, kernel candidates", "greedy")


def per_row(rows: np.ndarray, k: int, passes: int, repeats: int) -> dict[str, float]:
    """Microseconds a row, numpy's path and the kernel's, after checking they give the same ids."""
    for row in rows:
        probs = softmax_rows(row[None])[0]
        if top_k(probs, k).tolist() != choose_ops.top_k_softmax(row, k)[0].tolist():
            raise RuntimeError(f"numpy and the kernel chose different ids (k={k})")

    def numpy_path() -> None:
        for _ in range(passes):
            for row in rows:
                probs = softmax_rows(row[None])[0]
                ids = top_k(probs, k)
                _ = probs[ids]

    def kernel() -> None:
        for _ in range(passes):
            for row in rows:
                choose_ops.top_k_softmax(row, k)

    timings = interleaved({NUMPY: numpy_path, KERNEL: kernel}, repeats=repeats)
    us = {name: statistics.median(t) * 1e6 / (passes * len(rows)) for name, t in timings.wall.items()}
    return {**us, "speedup": ratio_median(timings.wall[NUMPY], timings.wall[KERNEL])}


def penalty(batch: int, repeats: int) -> dict[str, float]:
    """Microseconds a call of the degeneration penalty, numpy's and the kernel's, warm and cold
    (median over ``repeats`` calls each; the kernel's answer checked against numpy's)."""
    rng = np.random.default_rng(batch)

    def unit(*shape: int) -> np.ndarray:
        x = rng.standard_normal(shape).astype(np.float32)
        return (x / np.sqrt(np.square(x).sum(axis=-1, keepdims=True))).astype(np.float32)

    hidden, context = unit(batch, 4, 512), unit(batch, 65, 512)
    lengths = np.full(batch, 33, dtype=np.int64)
    choose_ops.use(False)
    want = degeneration_penalty(hidden, context, lengths)
    choose_ops.use(True)
    if np.abs(choose_ops.degeneration_penalty(hidden, context, lengths) - want).max() > 1e-6:
        raise RuntimeError("the kernel's degeneration penalty is not numpy's")
    flush = np.ones(10_000_000, dtype=np.float32)  # 40 MB: more than the last-level cache
    figures: dict[str, float] = {}
    for name, on in ((NUMPY, False), (KERNEL, True)):
        choose_ops.use(on)
        try:
            for cold in (False, True):
                times = []
                for _ in range(repeats):
                    if cold:
                        flush += 1.0
                    start = time.perf_counter()
                    degeneration_penalty(hidden, context, lengths)
                    times.append(time.perf_counter() - start)
                figures[f"{name} {'cold' if cold else 'warm'}"] = statistics.median(times) * 1e6
        finally:
            choose_ops.use(True)
    return figures


def on_decoder(runtime: T5Runtime, rounds: int) -> dict[str, float]:
    """Seconds of run_on_decoder at batch 8: contrastive with numpy's candidates and the kernel's,
    greedy; medians of interleaved rounds."""
    prompts = forced_prompts(BATCH, PROMPT_TOKENS)
    contrastive, greedy = DecodingParams.from_dict(CONTRASTIVE), DecodingParams.from_dict(GREEDY)
    ids: dict[str, list[tuple[int, ...]]] = {}

    def run(params: DecodingParams, kernel: bool, name: str) -> Callable[[], None]:
        def go() -> None:
            choose_ops.use(kernel)
            try:
                results = run_on_decoder(runtime, [GenerationRequest(tuple(p), params) for p in prompts])
            finally:
                choose_ops.use(True)
            if not all(len(r.token_ids) == NEW_TOKENS for r in results):
                raise RuntimeError(f"a row did not get {NEW_TOKENS} tokens")
            ids[name] = [tuple(r.token_ids) for r in results]

        return go

    contenders = dict(
        zip(
            DECODER_CONTENDERS,
            (run(contrastive, False, NUMPY), run(contrastive, True, KERNEL), run(greedy, True, "greedy")),
            strict=True,
        )
    )
    timings = interleaved(contenders, repeats=rounds)
    if ids[NUMPY] != ids[KERNEL]:
        raise RuntimeError("contrastive search chose other ids with the kernel's candidates")
    seconds = {name: statistics.median(t) for name, t in timings.wall.items()}
    # CPU seconds of this process (all threads): steadier than wall time while others load the
    # machine (the pool's threads spin a little while they wait, which counts here too).
    seconds |= {f"{name} (cpu)": statistics.median(t) for name, t in timings.cpu.items()}
    names = list(contenders)
    return {
        **seconds,
        "speedup": ratio_median(timings.wall[names[0]], timings.wall[names[1]]),
        "numpy / greedy": ratio_median(timings.wall[names[0]], timings.wall[names[2]]),
        "kernel / greedy": ratio_median(timings.wall[names[1]], timings.wall[names[2]]),
        "speedup (cpu)": ratio_median(timings.cpu[names[0]], timings.cpu[names[1]]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=8, help="random logit rows (a step's batch)")
    ap.add_argument("--passes", type=int, default=25, help="passes over the rows per timed call")
    ap.add_argument("--repeats", type=int, default=9, help="interleaved rounds of the per-row timing")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the decoder runs")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if not choose_ops.available():
        raise SystemExit(f"the kernel's top_k_softmax is not available: {qlinear.kernel_status()}")
    info = machine()
    info["kernel"] = qlinear.kernel_status()
    print(f"machine: {info}", flush=True)

    rng = np.random.default_rng(0)
    rows = (rng.standard_normal((args.rows, VOCAB)) * 3).astype(np.float32)
    rows_figures = {k: per_row(rows, k, args.passes, args.repeats) for k in (4, 8)}
    print(f"microseconds a row, V={VOCAB}")
    print(
        table(
            ["k", NUMPY, KERNEL, "speedup"],
            [
                [k, f"{f[NUMPY]:.1f}", f"{f[KERNEL]:.1f}", f"{f['speedup']:.1f}x"]
                for k, f in rows_figures.items()
            ],
        )
    )

    penalties = {batch: penalty(batch, 50 * args.repeats) for batch in (8, 16)}
    print("degeneration penalty, microseconds a call (4 candidates, 33 context positions)")
    print(
        table(
            ["batch", "numpy warm", "kernel warm", "numpy cold", "kernel cold"],
            [
                [
                    b,
                    *(
                        f"{f[f'{name} {state}']:.1f}"
                        for state in ("warm", "cold")
                        for name in (NUMPY, KERNEL)
                    ),
                ]
                for b, f in penalties.items()
            ],
        )
    )

    int8_dir, _ = small_models()
    runtime = T5Runtime.load(int8_dir, threads=args.threads)
    decoder = on_decoder(runtime, args.rounds)
    print(f"run_on_decoder, batch {BATCH}, {NEW_TOKENS} forced new tokens, alpha 0.6, k 4 (seconds)")
    print(
        table(
            ["contender", "median wall s", "median cpu s"],
            [
                [name, f"{decoder[name]:.3f}", f"{decoder[f'{name} (cpu)']:.3f}"]
                for name in DECODER_CONTENDERS
            ],
        )
    )
    print(
        f"kernel candidates: {decoder['speedup']:.3f}x faster (cpu time: {decoder['speedup (cpu)']:.3f}x); "
        "contrastive / greedy: "
        f"{decoder['numpy / greedy']:.2f}x with numpy's candidates, {decoder['kernel / greedy']:.2f}x with the kernel's"
    )
    path = save_json(
        "bench_choose",
        {
            "machine": info,
            "args": vars(args),
            "per_row_us": rows_figures,
            "penalty_us": penalties,
            "decoder_batch8": decoder,
        },
    )
    print(f"saved {path}")


if __name__ == "__main__":
    main()
