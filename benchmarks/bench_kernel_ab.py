"""Two builds of the compiled kernel side by side in one process: the same int8 products (the
packed VNNI modes) on build A and build B, alternating call batch by call batch, with their outputs
compared.

bench_ab.py compares whole decoder calls of two checkouts (each in its own process); this one
isolates the products, on FLAN-T5-small's shapes with their weights in cache (the arithmetic, not a
step's memory reads). A build is the kernel's shared object (engine/runtime/_qlinear*.so) of a
checkout: build a base checkout's kernel (`git worktree add BASE main`, then `python setup.py
build_ext --inplace` there) and pass both files. Each build starts its own thread pool; a short
pause before each timed batch lets the other build's helpers go back to sleep. Needs AVX512-VNNI.

    .venv/bin/python benchmarks/bench_kernel_ab.py --a BASE/engine/runtime/_qlinear.cpython-311-x86_64-linux-gnu.so
        [--b engine/runtime/_qlinear...so] [--rows 1,8,32] [--modes 2,4] [--threads 1] [--rounds 15]

Printed: per shape, rows and mode, the best and the median seconds a call of each build and their
ratios (A/B above 1: B is faster), and whether the two outputs are bit-identical. Saved to
benchmarks/out/bench_kernel_ab.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine, save_json, table  # noqa: E402
from engine.runtime import qlinear  # noqa: E402

# (outputs, inputs) of FLAN-T5-small's products, as bench_qlinear.py's
SHAPES = "1152x512,512x384,384x512,2048x512,512x1024,32128x512"


def load_build(path: Path, tag: str) -> ModuleType:
    """Import one build's shared object under a package name of its own, so two can live side by side."""
    if not path.is_file():
        raise SystemExit(f"no kernel build at {path}: build it with `python setup.py build_ext --inplace`")
    spec = importlib.util.spec_from_file_location(f"{tag}._qlinear", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path} as an extension module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not module.vnni_available():
        raise SystemExit("needs a CPU with AVX512-VNNI")
    return module


def ints(text: str, what: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise SystemExit(f"--{what}: expected comma-separated integers, got {text!r}") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", type=Path, required=True, help="the baseline build's shared object")
    parser.add_argument("--b", type=Path, help="the changed build's shared object (default: this checkout's)")
    parser.add_argument("--shapes", default=SHAPES, help="OUTxIN,... (default: FLAN-T5-small's)")
    parser.add_argument("--rows", default="1,8,32")
    parser.add_argument("--modes", default="2,4", help="2: int16 activations, 4: int8 (VNNI)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    b_path = args.b
    if b_path is None:
        found = sorted((ROOT / "engine" / "runtime").glob("_qlinear*.so"))
        if not found:
            raise SystemExit("this checkout has no kernel build: run `python setup.py build_ext --inplace`")
        b_path = found[0]
    builds = {"A": load_build(args.a.resolve(), "build_a"), "B": load_build(b_path.resolve(), "build_b")}
    modes = ints(args.modes, "modes")
    for mode in modes:
        if mode not in (qlinear.MODE_INT8_INT16, qlinear.MODE_INT8_VNNI):
            raise SystemExit(f"--modes: {mode} is not a packed VNNI mode (2 or 4)")
    shapes = []
    for item in args.shapes.split(","):
        try:
            n, k = (int(v) for v in item.split("x"))
        except ValueError:
            raise SystemExit(f"--shapes: expected OUTxIN items such as 512x1024, got {item!r}") from None
        shapes.append((n, k))
    info = machine()
    print(
        f"# {info['cpu']}, {info['date_utc']} UTC, load {info['load_average_1_5_15']}, {args.threads} threads"
    )
    print(f"# A: {args.a}\n# B: {b_path}")
    rng = np.random.default_rng(0)
    results: list[dict[str, Any]] = []
    for n, k in shapes:
        stored = rng.integers(-127, 128, (n, k), dtype=np.int8)
        layer = qlinear.Linear.from_stored(stored, rng.uniform(20, 200, n).astype(np.float32))
        assert layer.packed is not None and layer.scale is not None
        for m in ints(args.rows, "rows"):
            x = rng.standard_normal((m, k)).astype(np.float32)
            for mode in modes:
                outs = {name: np.empty((m, n), np.float32) for name in builds}
                times: dict[str, list[float]] = {name: [] for name in builds}
                repeats = max(5, int(2e7 // (m * n * k)))
                for r in range(args.rounds):
                    for name in ("A", "B") if r % 2 == 0 else ("B", "A"):
                        kernel, out = builds[name], outs[name]
                        time.sleep(0.002)  # the other build's pool helpers stop spinning
                        kernel.linear(x, layer.packed, layer.scale, out, m, k, n, mode, args.threads)
                        start = time.perf_counter()
                        for _ in range(repeats):
                            kernel.linear(x, layer.packed, layer.scale, out, m, k, n, mode, args.threads)
                        times[name].append((time.perf_counter() - start) / repeats)
                row: dict[str, Any] = {
                    "shape": f"{n}x{k}",
                    "rows": m,
                    "mode": mode,
                    **{f"{name}_best_s": min(t) for name, t in times.items()},
                    **{f"{name}_median_s": statistics.median(t) for name, t in times.items()},
                    "same_output": bool(np.array_equal(outs["A"], outs["B"])),
                }
                results.append(row)
                print(
                    f"{n}x{k} rows {m} mode {mode}: A {row['A_best_s'] * 1e6:.1f} us, "
                    f"B {row['B_best_s'] * 1e6:.1f} us (best), same output: {row['same_output']}",
                    flush=True,
                )
    print()
    print(
        table(
            ["shape", "rows", "mode", "A best us", "B best us", "A/B best", "A/B median", "same output"],
            [
                [
                    r["shape"],
                    r["rows"],
                    r["mode"],
                    f"{r['A_best_s'] * 1e6:.1f}",
                    f"{r['B_best_s'] * 1e6:.1f}",
                    f"{r['A_best_s'] / r['B_best_s']:.2f}x",
                    f"{r['A_median_s'] / r['B_median_s']:.2f}x",
                    "yes" if r["same_output"] else "NO",
                ]
                for r in results
            ],
        )
    )
    path = save_json(
        "bench_kernel_ab",
        {
            "machine": info,
            "a": str(args.a),
            "b": str(b_path),
            "threads": args.threads,
            "rounds": args.rounds,
            "results": results,
        },
    )
    print(f"saved {path}")


if __name__ == "__main__":
    main()
