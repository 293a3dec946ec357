"""The SQLite store's queue read (``SqliteJobStore.queued``, the batching policy's input, read
before every batch) with many jobs queued by many API keys.

Three ways to the same rows, timed side by side (interleaved rounds) on one store:

  per_owner_loop   the old code: one SELECT per owner with work (each owner's oldest jobs);
  window_function  one SELECT numbering each owner's jobs (ROW_NUMBER() OVER (PARTITION BY owner
                   ORDER BY seq)) and keeping the first ``per_owner`` of each;
  one_statement    the store's statement now: one SELECT that seeks each owner's head in the
                   (lane, owner, seq) index (a correlated subquery per owner of a JSON list);
  store.queued     the same through the store's method (its lock, the owners from its memory,
                   QueueEntry objects): what the batch loops pay.

Checks that all give the same rows, prints EXPLAIN QUERY PLAN of the last two and the
medians, and saves them to benchmarks/out/bench_store_queued_<owners>_owners.json.

    .venv/bin/python benchmarks/bench_store_queued.py [--queued 50000] [--owners 100] [--limit 32]
        [--repeats 15] [--reads 20]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import interleaved, machine, ratio_median, save_json, table  # noqa: E402
from engine.runtime.params import DecodingParams  # noqa: E402
from engine.serving.batching import Lane  # noqa: E402
from engine.serving.jobs import Job  # noqa: E402
from engine.serving.store.base import Submission, per_owner  # noqa: E402
from engine.serving.store.sqlite import _ENTRY_COLUMNS, _QUEUED_LANE, SqliteJobStore  # noqa: E402

WHERE = "status = 'queued' AND lane = ?"
WINDOW = (
    f"SELECT {_ENTRY_COLUMNS} FROM (SELECT {_ENTRY_COLUMNS},"
    f" ROW_NUMBER() OVER (PARTITION BY owner ORDER BY seq) AS turn FROM jobs WHERE {WHERE})"
    " WHERE turn <= ? ORDER BY seq"
)


def fill(store: SqliteJobStore, queued: int, owners: int) -> None:
    params = DecodingParams()
    for n in range(queued):
        job = Job(id=f"j{n}", owner=f"key{n % owners}", prompts=("p",), params=params, created_at=1.0)
        store.enqueue_deferred(Submission(job, 2, Lane.BATCH))
        if n % 1000 == 999:
            store.commit_deferred()
    store.commit_deferred()


def _repeated(way: Callable[[], object], reads: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(reads):
            way()

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queued", type=int, default=50_000)
    ap.add_argument("--owners", type=int, default=100)
    ap.add_argument(
        "--limit", type=int, default=32, help="queued()'s limit (the batch loop asks 4x its batch)"
    )
    ap.add_argument("--repeats", type=int, default=15, help="rounds; each times --reads reads of each way")
    ap.add_argument("--reads", type=int, default=20)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        store = SqliteJobStore(Path(tmp) / "jobs.db")
        started = time.perf_counter()
        fill(store, args.queued, args.owners)
        print(f"queued {args.queued} jobs over {args.owners} owners in {time.perf_counter() - started:.1f} s")
        db = store._db
        lane = Lane.BATCH.value
        owners = store._queue.owners(lane)
        each = per_owner(args.limit, len(owners))

        def per_owner_loop() -> list[Any]:
            rows: list[Any] = []
            for owner in owners:
                rows.extend(
                    db.execute(
                        f"SELECT {_ENTRY_COLUMNS} FROM jobs WHERE {WHERE} AND owner = ? ORDER BY seq LIMIT ?",
                        (lane, owner, each),
                    ).fetchall()
                )
            rows.sort(key=lambda r: r[1])
            return rows

        def window_function() -> list[Any]:
            return db.execute(WINDOW, (lane, each)).fetchall()

        def one_statement() -> list[Any]:
            return db.execute(_QUEUED_LANE, (json.dumps(owners), lane, each)).fetchall()

        def store_queued() -> list[Any]:
            return store.queued(Lane.BATCH, args.limit)

        reference = per_owner_loop()
        assert window_function() == reference
        assert one_statement() == reference
        assert [e.job_id for e in store_queued()] == [r[0] for r in reference]
        print(f"{len(reference)} rows per read ({each} per owner); all agree")
        plans = {}
        for name, sql, sql_args in (
            ("window_function", WINDOW, (lane, each)),
            ("one_statement", _QUEUED_LANE, (json.dumps(owners), lane, each)),
        ):
            plans[name] = [row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {sql}", sql_args)]
            print(f"EXPLAIN QUERY PLAN {name}:\n  " + "\n  ".join(plans[name]))

        ways = {
            "per_owner_loop": per_owner_loop,
            "window_function": window_function,
            "one_statement": one_statement,
            "store.queued": store_queued,
        }
        contenders = {name: _repeated(way, args.reads) for name, way in ways.items()}
        timings = interleaved(contenders, repeats=args.repeats, warmup=1)
        store.close()

    base = timings.wall["per_owner_loop"]
    rows = []
    figures: dict[str, Any] = {}
    for name in contenders:
        wall = sorted(timings.wall[name])
        median_ms = wall[len(wall) // 2] * 1000 / args.reads
        speedup = ratio_median(base, timings.wall[name])
        figures[name] = {
            "median_ms_a_read": median_ms,
            "min_ms_a_read": wall[0] * 1000 / args.reads,
            "speedup_vs_loop": speedup,
        }
        rows.append([name, f"{median_ms:.3f}", f"{wall[0] * 1000 / args.reads:.3f}", f"{speedup:.2f}x"])
    print(table(["read", "median ms a read", "min ms a read", "vs per_owner_loop"], rows))
    path = save_json(
        f"bench_store_queued_{args.owners}_owners",
        {
            "machine": machine(),
            "args": vars(args),
            "rows_per_read": len(reference),
            "plans": plans,
            **figures,
        },
    )
    print(f"saved {path}")


if __name__ == "__main__":
    main()
