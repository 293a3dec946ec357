"""Two builds of the engine side by side: the same decoder calls on checkout A and checkout B,
interleaved round by round, each in a worker process of its own (each imports its checkout's
engine and compiled kernel), with the ids each produced compared.

For a kernel change: `git worktree add BASE main` (BASE: a folder of your choice), build its kernel
there with this checkout's Python (`cd BASE && ../path/to/.venv/bin/python setup.py build_ext
--inplace`), then run this from the changed checkout (both workers run on its Python). Both
workers load the same model (bench_targets.py's: FLAN-T5-small shapes, random int8 weights) and
decode the same 100-token prompts, 64 new tokens forced, on our decoder; each round asks each
worker for the best of --repeats calls of every case, A and B alternating which goes first.
Printed: medians per case and the median of per-round A/B time ratios (B's speedup); "same ids" whether the
two builds produced the same tokens (a change meant to be exact must say yes).

    .venv/bin/python benchmarks/bench_ab.py --a BASE [--b .] [--rounds 5] [--repeats 2]
        [--cases greedy:8,contrastive:8] [--threads 2]

Saved to benchmarks/out/bench_ab.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]


def _worker(tree: Path, model: Path, threads: int) -> None:
    """Serve "strategy batch repeats" lines on stdin with one JSON line each: the best seconds and
    a digest of the ids."""
    sys.path.insert(0, str(tree))
    import engine
    from benchmarks.suite.contenders import FORCED_STRATEGIES, forced_prompts
    from engine.runtime.decoder_batch import run_on_decoder
    from engine.runtime.params import DecodingParams
    from engine.runtime.result import GenerationRequest
    from engine.runtime.t5 import T5Runtime

    runtime = T5Runtime.load(model, threads=threads)
    print(json.dumps({"ready": str(Path(engine.__file__).resolve().parent)}), flush=True)
    for line in sys.stdin:
        strategy, batch, repeats = line.split()
        params = DecodingParams.from_dict(FORCED_STRATEGIES[strategy])
        requests = [GenerationRequest(tuple(ids), params) for ids in forced_prompts(int(batch), 100)]
        best, digest = float("inf"), ""
        for _ in range(int(repeats)):
            start = time.perf_counter()
            results = run_on_decoder(runtime, requests)
            best = min(best, time.perf_counter() - start)
            digest = hashlib.sha256(repr([r.token_ids for r in results]).encode()).hexdigest()[:16]
        print(json.dumps({"seconds": best, "ids": digest}), flush=True)


class Worker:
    def __init__(self, tree: Path, model: Path, threads: int) -> None:
        env = dict(os.environ, PYTHONPATH=str(tree))
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", str(tree), str(model), str(threads)],
            cwd=tree,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.engine = self._read()["ready"]

    def _read(self) -> dict[str, Any]:
        out: IO[str] | None = self.proc.stdout
        assert out is not None
        line = out.readline()
        if not line:
            raise SystemExit(f"a worker stopped (exit {self.proc.wait()}); its error is above")
        return dict(json.loads(line))

    def ask(self, strategy: str, batch: int, repeats: int) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{strategy} {batch} {repeats}\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _cases(text: str) -> list[tuple[str, int]]:
    cases = []
    for item in text.split(","):
        strategy, _, batch = item.partition(":")
        if not batch.isdigit() or int(batch) < 1:
            raise SystemExit(f"--cases: {item!r} is not strategy:batch (for example contrastive:8)")
        cases.append((strategy, int(batch)))
    return cases


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", type=Path, required=True, help="the baseline checkout (its kernel built)")
    parser.add_argument("--b", type=Path, default=ROOT, help="the changed checkout (default: this one)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2, help="calls per case per round (the best counts)")
    parser.add_argument("--cases", default="greedy:1,greedy:8,contrastive:1,contrastive:8")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from benchmarks.common import machine, save_json, table
    from benchmarks.suite.contenders import FORCED_STRATEGIES, small_models

    cases = _cases(args.cases)
    for strategy, _ in cases:
        if strategy not in FORCED_STRATEGIES:
            raise SystemExit(
                f"--cases: unknown strategy {strategy!r} (one of {', '.join(sorted(FORCED_STRATEGIES))})"
            )
    trees = {"A": args.a.resolve(), "B": args.b.resolve()}
    for name, tree in trees.items():
        if not (tree / "engine" / "runtime").is_dir():
            raise SystemExit(f"--{name.lower()} {tree}: not a checkout of this project")
    model, _ = small_models()
    info = machine()
    workers = {name: Worker(tree, model, args.threads) for name, tree in trees.items()}
    seconds: dict[tuple[str, int], dict[str, list[float]]] = {c: {"A": [], "B": []} for c in cases}
    ids: dict[tuple[str, int], dict[str, set[str]]] = {c: {"A": set(), "B": set()} for c in cases}
    try:
        for name in workers:  # warm-up
            for strategy, batch in cases:
                workers[name].ask(strategy, batch, 1)
        for r in range(args.rounds):
            order = ["A", "B"] if r % 2 == 0 else ["B", "A"]
            for strategy, batch in cases:
                for name in order:
                    got = workers[name].ask(strategy, batch, args.repeats)
                    seconds[(strategy, batch)][name].append(got["seconds"])
                    ids[(strategy, batch)][name].add(got["ids"])
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        for w in workers.values():
            w.close()
    rows = []
    for case in cases:
        a, b = seconds[case]["A"], seconds[case]["B"]
        speedup = statistics.median(x / y for x, y in zip(a, b, strict=True))
        same = ids[case]["A"] == ids[case]["B"] and len(ids[case]["A"]) == 1
        rows.append(
            [
                case[0],
                case[1],
                f"{statistics.median(a):.4f}",
                f"{statistics.median(b):.4f}",
                f"{speedup:.3f}x",
                "yes" if same else "NO",
            ]
        )
    print(
        f"# {info['cpu']}, {info['date_utc']} UTC, load {info['load_average_1_5_15']}, {args.threads} threads"
    )
    print(f"# A: {workers['A'].engine}\n# B: {workers['B'].engine}")
    print(
        f"# medians of {args.rounds} rounds, each the best of {args.repeats} calls; 64 new tokens, 100-token prompts"
    )
    print(table(["strategy", "batch", "A s", "B s", "A / B", "same ids"], rows))
    path = save_json(
        "bench_ab",
        {
            "machine": info,
            "a": str(trees["A"]),
            "b": str(trees["B"]),
            "rounds": args.rounds,
            "repeats": args.repeats,
            "cases": [
                {
                    "strategy": s,
                    "batch": n,
                    "a_s": seconds[(s, n)]["A"],
                    "b_s": seconds[(s, n)]["B"],
                    "row": row,
                }
                for (s, n), row in zip(cases, rows, strict=True)
            ],
        },
    )
    print(f"saved {path}")


if __name__ == "__main__":
    main()
