"""Where a call on our decoder spends its time: every call into the compiled kernel timed, by
function, and what is left outside it (Python, numpy), for greedy or contrastive search.

A diagnostic, not a comparison: the timers add a little to each kernel call. FLAN-T5-small shapes,
random int8 weights (bench_targets.py's model), 100-token prompts, 64 new tokens forced; the best
of --repeats calls (the machine is shared). With the layers in one kernel call (the default) a
step's layers are one `decoder_layers` entry, broken down below it by the kernel's own timers of
its parts (t5ops.layers_timing: each product, self- and cross-attention, norms, residual adds, the
activation); `--one-by-one` runs them a function at a time from Python instead (the lm_head and
the encoder are always separate `linear`/`attention` calls).

    .venv/bin/python benchmarks/profile_step.py [--strategy greedy|contrastive] [--batch 8]
        [--one-by-one] [--repeats 3] [--threads 2]

Printed, and saved to benchmarks/out/profile_step.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine, save_json  # noqa: E402
from benchmarks.suite.contenders import FORCED_STRATEGIES, forced_prompts, small_models  # noqa: E402
from engine.runtime import qlinear, t5ops  # noqa: E402
from engine.runtime.decoder_batch import run_on_decoder  # noqa: E402
from engine.runtime.params import DecodingParams  # noqa: E402
from engine.runtime.result import GenerationRequest  # noqa: E402
from engine.runtime.t5 import T5Runtime  # noqa: E402


class TimedKernel:
    """The kernel module with each function timed into ``seconds`` (by name)."""

    def __init__(self, kernel: Any, seconds: defaultdict[str, float]) -> None:
        self._kernel, self._seconds = kernel, seconds

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._kernel, name)
        if not callable(target):
            return target

        def timed(*args: Any) -> Any:
            start = time.perf_counter()
            try:
                return target(*args)
            finally:
                self._seconds[name] += time.perf_counter() - start

        return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategy", choices=sorted(FORCED_STRATEGIES), default="contrastive")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--one-by-one", action="store_true", help="the layers a kernel function at a time")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if qlinear._KERNEL is None:
        raise SystemExit(f"needs the compiled kernel; here: {qlinear.kernel_status()}")
    model, _ = small_models()
    runtime = T5Runtime.load(model, threads=args.threads)
    runtime.use_layers_call(not args.one_by_one)
    params = DecodingParams.from_dict(FORCED_STRATEGIES[args.strategy])
    requests = [GenerationRequest(tuple(ids), params) for ids in forced_prompts(args.batch, 100)]
    info = machine()
    seconds: defaultdict[str, float] = defaultdict(float)
    kernel = qlinear._KERNEL
    qlinear._KERNEL = cast(Any, TimedKernel(kernel, seconds))
    run: Callable[[], object] = lambda: run_on_decoder(runtime, requests)  # noqa: E731
    layer_timers = not args.one_by_one and t5ops.layers_call_available()
    try:
        run()  # warm-up
        best: tuple[float, dict[str, float], dict[str, float]] | None = None
        for _ in range(args.repeats):
            seconds.clear()
            if layer_timers:
                t5ops.layers_timing(True)
            start = time.perf_counter()
            run()
            total = time.perf_counter() - start
            layer_parts = t5ops.layers_timing_read() if layer_timers else {}
            if best is None or total < best[0]:  # (the timers' own two calls left out)
                kept = {k: v for k, v in seconds.items() if not k.startswith("layers_timing")}
                best = (total, kept, layer_parts)
    finally:
        qlinear._KERNEL = kernel
        if layer_timers:
            t5ops.layers_timing(False)
    assert best is not None
    total, parts, layer_parts = best
    outside = total - sum(parts.values())
    layout = "one function at a time" if args.one_by_one else "layers in one call"
    print(
        f"# {info['cpu']}, {info['date_utc']} UTC, load {info['load_average_1_5_15']}, {args.threads} threads"
    )
    print(f"{args.strategy}, batch {args.batch}, {layout}: {total * 1e3:.1f} ms (best of {args.repeats})")
    for name, value in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<20} {value * 1e3:8.1f} ms")
        if name == "decoder_layers":
            for part, seconds_in in sorted(layer_parts.items(), key=lambda kv: -kv[1]):
                print(f"    {part:<18} {seconds_in * 1e3:8.1f} ms")
    print(f"  {'outside the kernel':<20} {outside * 1e3:8.1f} ms")
    path = save_json(
        "profile_step",
        {
            "machine": info,
            "strategy": args.strategy,
            "batch": args.batch,
            "layout": layout,
            "total_s": total,
            "kernel_s": parts,
            "decoder_layers_parts_s": layer_parts,
            "outside_s": outside,
        },
    )
    print(f"saved {path}")


if __name__ == "__main__":
    main()
