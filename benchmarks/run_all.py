"""The benchmark suite (issue 6): latency and throughput per hardware target, against the baselines,
as a report. `make bench` runs it (`make bench BENCH_ARGS="--preset full"`).

    .venv/bin/python benchmarks/run_all.py                      # --preset quick: small shape, c 1/4/16
    .venv/bin/python benchmarks/run_all.py --preset full        # small/base/large, c 1/4/16/64 (hours on 2 cores)
    .venv/bin/python benchmarks/run_all.py --strategies greedy --concurrency 1 16 --targets cpu-int8

Every request asks for a ~100-token prompt and exactly 64 new tokens (min_new_tokens =
max_new_tokens), on random weights with FLAN-T5's shapes (no download needed). Contenders: our
server (`engine serve`, REST, closed loop) per target, engine-only (Engine.generate_requests),
and the baselines: Transformers one request at a time (.venv-ref), ONNX Runtime int8 (.venv-onnx,
greedy), CTranslate2 called directly,
and our server at --max-batch-size 1. Output in benchmarks/out/<run-id>/: report.md (summary with
the issue's targets, tables, floor, plots), summary.json, machine.json, plan.json, runs/*.json,
plot-<shape>.png, logs/ (the servers' logs). CUDA targets run when CTranslate2 sees a GPU and are skipped with a note otherwise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import OUT_DIR  # noqa: E402
from benchmarks.suite.matrix import BASELINES, PRESETS, SHAPES, SMOKE_SHAPE, STRATEGIES, TARGETS, build_plan  # noqa: E402
from engine.errors import EngineError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run_all.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", choices=list(PRESETS), default="quick")
    p.add_argument(
        "--shapes", nargs="+", metavar="SHAPE", help=f"{', '.join(SHAPES)} ({SMOKE_SHAPE}: smoke runs)"
    )
    p.add_argument("--strategies", nargs="+", metavar="S", help=", ".join(STRATEGIES))
    p.add_argument("--concurrency", nargs="+", type=int, metavar="N", help="concurrent clients per cell")
    p.add_argument("--targets", nargs="+", metavar="T", help=", ".join(TARGETS))
    p.add_argument(
        "--baselines", nargs="*", metavar="B", help=f"{', '.join(BASELINES)} (default all; none: no value)"
    )
    p.add_argument("--requests", type=int, help="requests per cell and round (preset's default otherwise)")
    p.add_argument("--rounds", type=int, help="interleaved rounds")
    p.add_argument("--new-tokens", type=int, default=64, help="new tokens forced per request (default 64)")
    p.add_argument("--prompt-tokens", type=int, default=100, help="prompt length in tokens (default 100)")
    p.add_argument(
        "--out", type=Path, default=OUT_DIR, help="where the run's folder goes (default benchmarks/out)"
    )
    p.add_argument(
        "--models", type=Path, default=OUT_DIR / "models", help="where model folders are built and reused"
    )
    p.add_argument("--run-id", default=None, help="the run's folder name (default: UTC time and preset)")
    p.add_argument(
        "--report-from",
        type=Path,
        default=None,
        metavar="RUN_DIR",
        help="only rebuild RUN_DIR's report from its saved JSON (an interrupted run keeps what it measured)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import ctranslate2

    from benchmarks.suite.contenders import ONNX_PYTHON, REF_PYTHON
    from benchmarks.suite.runner import rebuild_report, run

    if args.report_from is not None:
        if not (args.report_from / "plan.json").is_file():
            print(f"error: {args.report_from} is not a run folder (no plan.json)", file=sys.stderr)
            return 2
        rebuilt = rebuild_report(args.report_from)
        print(rebuilt.summary)
        print(f"report: {rebuilt.report}")
        return 0
    try:
        plan = build_plan(
            args.preset,
            cuda_devices=ctranslate2.get_cuda_device_count(),
            shapes=args.shapes,
            strategies=args.strategies,
            concurrency=args.concurrency,
            targets=args.targets,
            requests=args.requests,
            rounds=args.rounds,
            new_tokens=args.new_tokens,
            prompt_tokens=args.prompt_tokens,
            baselines=args.baselines,
            hf_available=REF_PYTHON.is_file(),
            onnx_available=ONNX_PYTHON.is_file(),
        )
    except EngineError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    run_id = args.run_id or f"{dt.datetime.now(dt.timezone.utc):%Y%m%d-%H%M%S}-{plan.preset}"
    out_dir = args.out / run_id
    if out_dir.exists() and any(out_dir.iterdir()):
        print(f"error: {out_dir} already holds a run; pick another --run-id", file=sys.stderr)
        return 2
    for skipped in plan.skipped:
        print(f"skipped {skipped.what}: {skipped.reason}", flush=True)
    argv_text = " ".join(sys.argv[1:] if argv is None else argv)
    command = f"benchmarks/run_all.py {argv_text}".strip()
    result = run(plan, out_dir, command=command, models=args.models, progress=not args.no_progress)
    print()
    print(result.summary)
    print()
    print(f"report: {result.report}")
    if result.failed_requests:
        print(
            f"{result.failed_requests} requests failed: see the report's 'Failed requests'", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
