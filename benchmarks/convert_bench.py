"""Conversion cost: engine's numpy converter against CTranslate2's TransformersConverter (torch).

Both convert the same FLAN-T5-small-shaped random checkpoint (written once by
``write_hf_checkpoint``); each conversion runs in a fresh subprocess, so that its wall time
includes the imports it needs (torch + transformers for the reference, not for ours) and its peak
resident memory is its own. Runs are interleaved and repeated; medians and ratios are printed and
saved to benchmarks/out/convert.json.

  .venv/bin/python benchmarks/convert_bench.py [--size small] [--repeats 3] [--quantization int8 float32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = {
    "engine": """
import resource, sys, time
t = time.perf_counter()
from engine.model.convert import convert_checkpoint
convert_checkpoint(sys.argv[1], sys.argv[2], quantization=sys.argv[3])
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
""",
    "ctranslate2": """
import resource, sys, time
t = time.perf_counter()
from ctranslate2.converters import TransformersConverter
TransformersConverter(sys.argv[1]).convert(sys.argv[2], quantization=sys.argv[3])
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
""",
}


def run_once(method: str, hf_dir: Path, out: Path, quantization: str) -> tuple[float, float]:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD[method], str(hf_dir), str(out), quantization],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    seconds, maxrss_kib = proc.stdout.split()[-2:]
    return float(seconds), int(maxrss_kib) / 1024


def main() -> None:
    from engine.model.demo import write_hf_checkpoint
    from engine.model.shapes import preset

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="small")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quantization", nargs="+", default=["int8", "float32"])
    args = parser.parse_args()

    samples: dict[str, list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = write_hf_checkpoint(Path(tmp) / "hf", preset(args.size), seed=0)
        for rep in range(args.repeats):
            for q in args.quantization:
                methods = ["engine", "ctranslate2"] if rep % 2 == 0 else ["ctranslate2", "engine"]
                for method in methods:
                    out = Path(tmp) / f"{method}-{q}-{rep}"
                    samples.setdefault(f"{method}/{q}", []).append(run_once(method, hf_dir, out, q))

    rows = []
    print(
        f"{'quantization':<13}{'converter':<14}{'wall s (median)':>16}{'peak RSS MiB':>14}{'time ratio':>12}"
    )
    for q in args.quantization:
        ref_s = statistics.median(s for s, _ in samples[f"ctranslate2/{q}"])
        for method in ("ctranslate2", "engine"):
            runs = samples[f"{method}/{q}"]
            wall = statistics.median(s for s, _ in runs)
            rss = max(m for _, m in runs)
            ratio = ref_s / wall
            rows.append(
                {
                    "quantization": q,
                    "converter": method,
                    "wall_s": wall,
                    "peak_rss_mib": rss,
                    "speedup_vs_ctranslate2": ratio,
                    "runs": runs,
                }
            )
            print(f"{q:<13}{method:<14}{wall:>16.2f}{rss:>14.0f}{ratio:>11.2f}x")
    out_dir = ROOT / "benchmarks" / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "size": args.size,
        "repeats": args.repeats,
        "rows": rows,
    }
    (out_dir / "convert.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"saved {out_dir / 'convert.json'}")


if __name__ == "__main__":
    main()
