"""The per-token text work of a row, old against new, side by side: the stop-sequence check
(engine/runtime/stop.py) and a stream's text deltas (engine/api/deltas.py).

  full_decode         the old check: after every new id, decode the whole row and search all of
                      it (O(n^2) per row);
  incremental         StopSequences.check now: the row's text decoded incrementally (a window of
                      ids per new id) and only its new end searched;
  deltas_full_decode  the old TextDeltas.push: decode the whole row, release what is settled;
  deltas_incremental  TextDeltas.push now, on the same incremental text.

Each row is the ids of random words (the demo model's sentencepiece tokenizer, the tests' one),
checked id by id against two stop strings that never match (the usual case: the row runs to its
end). Both must give the same answer (checked). Figures are milliseconds per row, median of
interleaved rounds, printed and saved to benchmarks/out/bench_stop.json.

    .venv/bin/python benchmarks/bench_stop.py [--lengths 64,256,512] [--rows 20] [--repeats 7]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import interleaved, machine, ratio_median, save_json, table  # noqa: E402
from engine.api.deltas import TextDeltas  # noqa: E402
from engine.model.demo import DEMO_SPIECE  # noqa: E402
from engine.model.tokenizer import Tokenizer  # noqa: E402
from engine.runtime.stop import StopCut, StopSequences  # noqa: E402

WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "his",
    "it",
    "an",
    "were",
    "are",
    "which",
    "this",
]
STOPS = ("\u2603never", "###")


def full_decode_check(decode: Callable[[Sequence[int]], str], ids: Sequence[int]) -> StopCut | None:
    """The old StopSequences.check: decode the whole row, search all of it."""
    text = decode(ids)
    found = [i for i in (text.find(s) for s in STOPS) if i >= 0]
    return StopCut(len(ids), text[: min(found)]) if found else None


class WholeRowDeltas(TextDeltas):
    """The old TextDeltas.push: the whole row decoded for every new id."""

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        super().__init__(decode, STOPS)
        self._whole = decode
        self._ids: list[int] = []

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = self._whole(self._ids)
        return self._release(text) if text.startswith(self.sent) else ""


def rows(tok: Tokenizer, length: int, count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        ids: list[int] = []
        while len(ids) < length:
            ids.extend(tok.encode(" ".join(rng.choice(WORDS) for _ in range(20)))[:-1])
        out.append(ids[:length])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="64,256,512", help="new tokens per row")
    ap.add_argument("--rows", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    tok = Tokenizer(DEMO_SPIECE)
    figures = {}
    table_rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        batch = rows(tok, length, args.rows, seed=length)

        def old(batch: list[list[int]] = batch) -> None:
            for ids in batch:
                row: list[int] = []
                for token_id in ids:
                    row.append(token_id)
                    assert full_decode_check(tok.decode, row) is None

        def new(batch: list[list[int]] = batch) -> None:
            for ids in batch:
                stop = StopSequences(STOPS, tok.decode)
                row: list[int] = []
                for token_id in ids:
                    row.append(token_id)
                    assert stop.check(row) is None

        def deltas(make: Callable[[], TextDeltas], batch: list[list[int]] = batch) -> Callable[[], None]:
            def run() -> None:
                for ids in batch:
                    row = make()
                    sent = "".join(row.push(token_id) for token_id in ids)
                    assert tok.decode(ids).startswith(sent)

            return run

        contenders = {
            "full_decode": old,
            "incremental": new,
            "deltas_full_decode": deltas(lambda: WholeRowDeltas(tok.decode)),
            "deltas_incremental": deltas(lambda: TextDeltas(tok.decode, STOPS)),
        }
        timings = interleaved(contenders, repeats=args.repeats)
        per_row = {name: statistics.median(t) * 1000 / args.rows for name, t in timings.wall.items()}
        speedup = ratio_median(timings.wall["full_decode"], timings.wall["incremental"])
        deltas_speedup = ratio_median(timings.wall["deltas_full_decode"], timings.wall["deltas_incremental"])
        figures[str(length)] = {"ms_per_row": per_row, "speedup": speedup, "deltas_speedup": deltas_speedup}
        table_rows.append(
            [
                length,
                f"{per_row['full_decode']:.3f}",
                f"{per_row['incremental']:.3f}",
                f"{speedup:.1f}x",
                f"{per_row['deltas_full_decode']:.3f}",
                f"{per_row['deltas_incremental']:.3f}",
                f"{deltas_speedup:.1f}x",
            ]
        )
    headers = ["new tokens", "stop: full_decode", "stop: incremental", "speedup"]
    headers += ["deltas: full_decode", "deltas: incremental", "speedup"]
    print("milliseconds per row")
    print(table(headers, table_rows))
    path = save_json("bench_stop", {"machine": machine(), "args": vars(args), "figures": figures})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
