"""int8 token agreement with Transformers fp32: our decoder int8 against CTranslate2 int8.

For each checkpoint (random weights; FLAN-T5-small's shapes and the tests' tiny FLAN and T5
shapes, several seeds), many prompts of mixed lengths are decoded greedily (32 new tokens) by
Transformers 4.55 in float32 (scripts/reference.py in .venv-ref: the reference), by our decoder on
the int8 folder and by CTranslate2 on the same int8 folder. Per backend: the share of prompts whose
ids equal the reference's exactly, and the mean share of the reference's tokens matched before the
first difference. Printed and saved to benchmarks/out/int8_agreement.json.

Random weights make next-token distributions flatter than a trained model's, so int8 rounding
flips more choices than it would on real checkpoints: the rates compare the two int8 paths with
each other, they do not predict a trained model's agreement.

    .venv/bin/python benchmarks/int8_agreement.py [--prompts 64] [--new-tokens 32]
        [--grouped-int8 64 [--grouped-where wo|lm_head|both]]

``--grouped-int8 G`` asks what int8 activations with one scale per G inputs (instead of the int16
activations qlinear keeps for the decoder's feed-forward output and the lm_head) would cost in
agreement, before building such a kernel mode: each activation row of those products is rounded
to int8 per group of G inputs in numpy and fed to the int16 product (whose own rounding is 128
times finer), an emulation of the arithmetic, not a kernel.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import OUT_DIR, machine, save_json, table  # noqa: E402
from engine.model.convert import convert_checkpoint  # noqa: E402
from engine.model.demo import write_hf_checkpoint  # noqa: E402
from engine.model.shapes import TINY_FLAN, TINY_T5, T5Shape, preset  # noqa: E402
from engine.runtime import qlinear  # noqa: E402
from engine.runtime.ct2 import DecodeOptions  # noqa: E402
from engine.runtime.decoder_batch import run_on_decoder  # noqa: E402
from engine.runtime.engine import Engine  # noqa: E402
from engine.runtime.params import DecodingParams  # noqa: E402
from engine.runtime.result import GenerationRequest  # noqa: E402
from engine.runtime.t5 import T5Runtime  # noqa: E402

REF_PYTHON = ROOT / ".venv-ref" / "bin" / "python"
MODELS = OUT_DIR / "models" / "agreement"
CHECKPOINTS: dict[str, tuple[T5Shape, int]] = {
    "flan-small seed 0": (preset("small"), 0),
    "tiny flan seed 1": (TINY_FLAN, 1),
    "tiny flan seed 2": (TINY_FLAN, 2),
    "tiny t5 seed 1": (TINY_T5, 1),
}


def folders(name: str, shape: T5Shape, seed: int) -> tuple[Path, Path]:
    """(HF checkpoint, int8 model folder), built once."""
    base = MODELS / name.replace(" ", "-")
    hf, int8 = base / "hf", base / "int8"
    if not (hf / "model.safetensors").is_file():
        write_hf_checkpoint(hf, shape, seed)
    if not (int8 / "engine.json").is_file():
        convert_checkpoint(hf, int8, quantization="int8", random_weights=True, force=True)
    return hf, int8


def prompts(count: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [
        [*(int(i) for i in rng.integers(3, 900, size=int(n))), 1] for n in rng.integers(4, 60, size=count)
    ]


def reference(hf: Path, inputs: list[list[int]], new_tokens: int) -> list[list[int]]:
    cases = [{"input_ids": [ids], "params": {"max_new_tokens": new_tokens}} for ids in inputs]
    proc = subprocess.run(
        [str(REF_PYTHON), str(ROOT / "scripts" / "reference.py")],
        input=json.dumps({"model": str(hf), "cases": cases}),
        capture_output=True,
        text=True,
        check=True,
    )
    return [case[0] for case in json.loads(proc.stdout)["outputs"]]


def agreement(got: list[list[int]], want: list[list[int]]) -> tuple[float, float]:
    """(share of exact matches, mean share of the reference matched before the first difference)."""
    exact = sum(g == w for g, w in zip(got, want, strict=True)) / len(want)
    prefixes = []
    for g, w in zip(got, want, strict=True):
        n = 0
        while n < min(len(g), len(w)) and g[n] == w[n]:
            n += 1
        prefixes.append(n / max(len(w), 1))
    return exact, statistics.mean(prefixes)


def emulate_grouped_int8(group: int, where: str) -> None:
    """Round the activations of the int16 products (``where``: the decoder's feed-forward output
    projections, the lm_head, or both) to int8 with a scale per ``group`` inputs, for the rest of
    this process (see the module's docstring)."""
    plain = qlinear.Linear.__call__

    def grouped(x: np.ndarray) -> np.ndarray:
        rows, k = x.shape
        padded = np.zeros((rows, -(-k // group) * group), dtype=np.float32)
        padded[:, :k] = x
        blocks = padded.reshape(rows, -1, group)
        scale = np.abs(blocks).max(axis=-1, keepdims=True) / 127.0
        scale[scale == 0] = 1.0
        return (
            (np.clip(np.rint(blocks / scale), -127, 127) * scale).reshape(rows, -1)[:, :k].astype(np.float32)
        )

    def call(self: qlinear.Linear, x: np.ndarray, threads: int = 1, kernel: bool = True) -> np.ndarray:
        if self.mode == qlinear.MODE_INT8_INT16:
            head = self.shape[0] > self.shape[1] * 8  # the lm_head: [vocabulary, d_model]
            if where == "both" or (where == "lm_head") == head:
                x = grouped(np.asarray(x, dtype=np.float32))
        return plain(self, x, threads, kernel)

    qlinear.Linear.__call__ = call  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument(
        "--grouped-int8", type=int, default=0, metavar="G", help="emulate int8 activations per G inputs"
    )
    parser.add_argument("--grouped-where", choices=["wo", "lm_head", "both"], default="both")
    args = parser.parse_args()
    if args.grouped_int8 < 0:
        parser.error("--grouped-int8 must be 0 (off) or a group size")
    if args.grouped_int8:
        emulate_grouped_int8(args.grouped_int8, args.grouped_where)
    if not REF_PYTHON.exists():
        raise SystemExit(f"{REF_PYTHON} missing: the reference environment is needed (make test)")
    info = machine()
    print(
        f"# {info['cpu']}, {info['date_utc']} UTC, {args.prompts} prompts each, {args.new_tokens} new tokens"
    )
    params = DecodingParams(max_new_tokens=args.new_tokens)
    rows, payload = [], []
    totals: dict[str, list[float]] = {"decoder": [], "ctranslate2": []}
    for name, (shape, seed) in CHECKPOINTS.items():
        hf, int8 = folders(name, shape, seed)
        inputs = prompts(args.prompts, seed + 100)
        want = reference(hf, inputs, args.new_tokens)
        runtime = T5Runtime.load(int8)
        if args.grouped_int8:  # the emulation wraps the Python product: no layers in one kernel call
            runtime.use_layers_call(False)
        ours = [
            list(r.token_ids)
            for r in run_on_decoder(runtime, [GenerationRequest(tuple(p), params) for p in inputs])
        ]
        engine = Engine(int8, compute_type="int8")
        ct2 = [
            list(h.token_ids) for h in engine.translator.translate(inputs, DecodeOptions.from_params(params))
        ]
        for backend, got in (("decoder", ours), ("ctranslate2", ct2)):
            exact, prefix = agreement(got, want)
            totals[backend].append(exact)
            rows.append([name, backend, f"{exact:.1%}", f"{prefix:.1%}"])
            payload.append({"checkpoint": name, "backend": backend, "exact": exact, "prefix": prefix})
            print(
                table(
                    ["checkpoint", "int8 backend", "ids equal fp32", "prefix matched"], [rows[-1]]
                ).splitlines()[-1],
                flush=True,
            )
    print()
    print(table(["checkpoint", "int8 backend", "ids equal fp32", "prefix matched"], rows))
    for backend, values in totals.items():
        print(
            f"{backend} int8: ids equal Transformers fp32 on {statistics.mean(values):.1%} of prompts (mean over checkpoints)"
        )
    path = save_json(
        "int8_agreement",
        {
            "machine": info,
            "prompts": args.prompts,
            "new_tokens": args.new_tokens,
            "grouped_int8": args.grouped_int8 and {"group": args.grouped_int8, "where": args.grouped_where},
            "rows": payload,
        },
    )
    print(f"saved {path}")


if __name__ == "__main__":
    main()
