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
import json
import statistics
import subprocess
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
from threadpoolctl import threadpool_info, threadpool_limits  # type: ignore[import-untyped]  # noqa: E402

from benchmarks.common import OUT_DIR, machine  # noqa: E402
from engine.model.demo import build_demo_model  # noqa: E402
from engine.runtime import contrastive  # noqa: E402
from engine.runtime.contrastive import ContrastiveBatch, generate_contrastive  # noqa: E402
from engine.runtime.params import DecodingParams  # noqa: E402
from engine.runtime.result import GenerationRequest  # noqa: E402
from engine.runtime.t5 import T5Runtime  # noqa: E402

THREADS = 2
NEW_TOKENS = 64
PROMPT_TOKENS = 100
PARAMS = {"penalty_alpha": 0.6, "top_k": 4, "max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS}
MODELS = OUT_DIR / "models"


def build_models() -> tuple[Path, Path]:
    int8_dir, hf_dir = MODELS / "contrastive-small-int8", MODELS / "contrastive-small-hf"
    if not (int8_dir / "engine.json").is_file() or not (hf_dir / "model.safetensors").is_file():
        build_demo_model(int8_dir, size="small", seed=0, quantization="int8", hf_output=hf_dir, force=True)
    return int8_dir, hf_dir


def prompts(batch: int) -> list[list[int]]:
    rng = np.random.default_rng(batch)
    return [[*(int(i) for i in rng.integers(3, 30000, size=PROMPT_TOKENS - 1)), 1] for _ in range(batch)]


class Transformers:
    """Transformers' generate() in .venv-ref, kept alive so that its runs interleave with ours."""

    def __init__(self, hf_dir: Path) -> None:
        self.proc = subprocess.Popen(
            [
                str(ROOT / ".venv-ref" / "bin" / "python"),
                str(ROOT / "benchmarks" / "hf_contrastive_timer.py"),
                str(hf_dir),
                str(THREADS),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.info = self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the Transformers timer exited; see its stderr above")
        out: dict[str, Any] = json.loads(line)
        return out

    def run(self, batch: list[list[int]], params: dict[str, Any]) -> float:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"input_ids": batch, "params": params}) + "\n")
        self.proc.stdin.flush()
        out = self._read()
        assert all(n == params["max_new_tokens"] for n in out["lengths"]), out
        return float(out["seconds"])

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


def ours(runtime: T5Runtime, batch: list[list[int]]) -> float:
    params = DecodingParams.from_dict(PARAMS)
    start = time.perf_counter()
    results = generate_contrastive(runtime, [GenerationRequest(tuple(ids), params) for ids in batch])
    seconds = time.perf_counter() - start
    assert all(len(r.token_ids) == NEW_TOKENS for r in results)
    return seconds


def ct2_greedy(translator: ctranslate2.Translator, vocab: list[str], batch: list[list[int]]) -> float:
    source = [[vocab[i] for i in ids] for ids in batch]
    start = time.perf_counter()
    out = translator.translate_batch(
        source, beam_size=1, max_decoding_length=NEW_TOKENS, min_decoding_length=NEW_TOKENS
    )
    seconds = time.perf_counter() - start
    assert all(len(r.hypotheses[0]) == NEW_TOKENS for r in out)
    return seconds


# ---------------------------------------------------------------------- per-part breakdown
@contextmanager
def timed_parts(runtime: T5Runtime, seconds: dict[str, float]) -> Iterator[None]:
    """Wrap the runtime's step parts with timers (instance attributes shadow the methods)."""
    patched: list[tuple[Any, str]] = []

    def wrap(owner: Any, name: str, part: str) -> None:
        inner: Callable[..., Any] = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                seconds[part] += time.perf_counter() - start

        setattr(owner, name, timed)
        patched.append((owner, name))

    wrap(runtime, "encode", "encoder (+ cross K/V)")
    wrap(runtime, "_self_attention", "self-attention (qkv, o)")
    wrap(runtime, "_cross_attention", "cross-attention (q, o)")
    wrap(runtime, "_ffn", "feed-forward")
    wrap(runtime, "logits", "lm_head")
    wrap(contrastive, "degeneration_penalty", "degeneration penalty")
    wrap(ContrastiveBatch, "_candidates", "processors + softmax + top-k")
    wrap(runtime, "decoder_step", "decoder step (total)")
    try:
        yield
    finally:
        for owner, name in patched:
            if owner is runtime:
                delattr(owner, name)
        contrastive.degeneration_penalty = _original_penalty
        ContrastiveBatch._candidates = _original_candidates  # type: ignore[method-assign]


_original_penalty = contrastive.degeneration_penalty
_original_candidates = ContrastiveBatch._candidates


def breakdown(runtime: T5Runtime, batch: list[list[int]]) -> dict[str, float]:
    seconds: dict[str, float] = defaultdict(float)
    with timed_parts(runtime, seconds):
        total = ours(runtime, batch)
    steps = NEW_TOKENS
    inside = sum(v for k, v in seconds.items() if k.startswith(("self-", "cross-", "feed-")))
    parts = {k: v * 1e3 / steps for k, v in seconds.items() if k != "encoder (+ cross K/V)"}
    parts["decoder step: norms, embeddings, Python"] = (
        (seconds["decoder step (total)"] - inside) * 1e3 / steps
    )
    outside = total - seconds["decoder step (total)"] - seconds["encoder (+ cross K/V)"]
    outside -= seconds["lm_head"] + seconds["degeneration penalty"] + seconds["processors + softmax + top-k"]
    parts["batch bookkeeping (commit, events, Python)"] = outside * 1e3 / steps
    parts["encoder (+ cross K/V), whole run ms"] = seconds["encoder (+ cross K/V)"] * 1e3
    parts["total ms per step (whole run / 64)"] = total * 1e3 / steps
    return parts


def bandwidth_gbs() -> float:
    a = np.ones(128 * 1024 * 1024, dtype=np.float32)  # 512 MiB: past any cache
    b = np.empty_like(a)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        np.copyto(b, a)
        times.append(time.perf_counter() - start)
    return 2 * a.nbytes / min(times) / 1e9  # read + write


def step_weight_bytes(runtime: T5Runtime) -> dict[str, int]:
    """Weights one contrastive step reads: every decoder weight except the cross-attention K/V
    projection (applied once per prompt), and the lm_head once."""
    decoder = 0
    for layer in runtime.decoder:
        arrays = (layer.qkv, layer.self_out, layer.cross_q, layer.cross_out, layer.ffn.wi, layer.ffn.wo)
        decoder += sum(int(a.nbytes) for a in arrays)
    return {"decoder": decoder, "lm_head": int(runtime.lm_head.nbytes)}


# ---------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", default="1,8")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    int8_dir, hf_dir = build_models()
    info = machine()
    runtime = T5Runtime.load(int8_dir)
    vocab = json.loads((int8_dir / "shared_vocabulary.json").read_text())
    translator = ctranslate2.Translator(
        str(int8_dir), device="cpu", compute_type="int8", intra_threads=THREADS
    )
    hf = Transformers(hf_dir)
    info["transformers_reference"] = hf.info["transformers"]
    with threadpool_limits(limits=THREADS, user_api="blas"):
        info["blas"] = [
            {k: v for k, v in pool.items() if k in ("internal_api", "architecture", "num_threads", "version")}
            for pool in threadpool_info()
        ]
        print(f"machine: {info}", flush=True)

        data = {b: prompts(b) for b in batches}
        for b in batches:  # warm-up, untimed
            ours(runtime, data[b][:1])
            ct2_greedy(translator, vocab, data[b][:1])
        hf.run(data[1][:1], {**PARAMS, "max_new_tokens": 4, "min_new_tokens": 4})

        times: dict[tuple[str, int], list[float]] = defaultdict(list)
        contenders: list[tuple[str, Callable[[list[list[int]]], float]]] = [
            ("ours contrastive", lambda batch: ours(runtime, batch)),
            ("transformers contrastive", lambda batch: hf.run(batch, PARAMS)),
            ("ctranslate2 int8 greedy", lambda batch: ct2_greedy(translator, vocab, batch)),
        ]
        for r in range(args.rounds):
            order = contenders[r % 3 :] + contenders[: r % 3]  # rotate who goes first
            for b in batches:
                for name, run in order:
                    times[(name, b)].append(run(data[b]))
            print(f"round {r + 1}/{args.rounds} done", flush=True)
        hf.close()

        parts = {b: breakdown(runtime, data[b]) for b in batches}
    gbs = bandwidth_gbs()
    weights = step_weight_bytes(runtime)
    floor_ms = sum(weights.values()) / (gbs * 1e9) * 1e3

    rows = []
    for b in batches:
        med = {name: statistics.median(times[(name, b)]) for name, _ in contenders}
        ratio_hf = statistics.median(
            h / o
            for h, o in zip(
                times[("transformers contrastive", b)], times[("ours contrastive", b)], strict=True
            )
        )
        ratio_greedy = statistics.median(
            o / g
            for o, g in zip(
                times[("ours contrastive", b)], times[("ctranslate2 int8 greedy", b)], strict=True
            )
        )
        rows.append(
            {
                "batch": b,
                **{f"{k} s": v for k, v in med.items()},
                "speedup vs transformers": ratio_hf,
                "ours / greedy": ratio_greedy,
            }
        )

    print()
    print(
        f"{'batch':>5} {'ours s':>8} {'HF 4.55 s':>10} {'CT2 greedy s':>13} {'HF / ours':>10} {'ours / greedy':>14}"
    )
    for row in rows:
        print(
            f"{row['batch']:>5} {row['ours contrastive s']:>8.3f} {row['transformers contrastive s']:>10.3f} "
            f"{row['ctranslate2 int8 greedy s']:>13.3f} {row['speedup vs transformers']:>9.2f}x "
            f"{row['ours / greedy']:>13.2f}x"
        )
    print()
    print("per step, ms (instrumented pass; 64 steps; parts of the decoder step are inside its total)")
    names = list(parts[batches[0]])
    print(f"{'part':<48}" + "".join(f"{'batch ' + str(b):>12}" for b in batches))
    for name in names:
        print(f"{name:<48}" + "".join(f"{parts[b][name]:>12.2f}" for b in batches))
    print()
    print(
        f"floor: {sum(weights.values()) / 1e6:.1f} MB of float32 weights per step (decoder "
        f"{weights['decoder'] / 1e6:.1f} MB + lm_head {weights['lm_head'] / 1e6:.1f} MB) / {gbs:.1f} GB/s "
        f"measured copy bandwidth = {floor_ms:.2f} ms per step"
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
                "parts_ms_per_step": {str(b): p for b, p in parts.items()},
                "bandwidth_gbs": gbs,
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
