"""A real serving process for the recovery tests: JobService + SQLite store + a slow FakeEngine.

    python scripts/serving_harness.py --db DB --log LOG [--submit N] [--exit-when-done]

It submits N greedy jobs (prompts "job 0", "job 1", ...; printing ``{"accepted": id}`` per job
and ``{"submitted": N}`` after the last), then serves until SIGTERM (graceful: the service's
stop(), as the real server does) or, with --exit-when-done, until no job is queued or running.
Every completion the store accepts is appended to LOG as ``<job id> <attempt> <pid>``, so a test
can count completions across processes (tests/test_recovery.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.config import Config
from engine.runtime.params import DecodingParams
from engine.serving.jobs import JobResult, JobStatus
from engine.serving.service import JobService
from engine.serving.store.base import Completion
from engine.serving.store.sqlite import SqliteJobStore
from harness.fakes import FakeEngine

OWNER = "harness"


class LoggingStore(SqliteJobStore):
    def __init__(self, path: str, log_path: str) -> None:
        super().__init__(path)
        self._log = open(log_path, "a")  # noqa: SIM115 (kept open for the process's life)

    def complete(self, job_id: str, attempt: int, result: JobResult, now: float) -> bool:
        ok = super().complete(job_id, attempt, result, now)
        if ok:
            self._logged([job_id], [attempt])
        return ok

    def complete_many(self, completions: Sequence[Completion], now: float) -> list[bool]:
        oks = super().complete_many(completions, now)
        done = [c for c, ok in zip(completions, oks, strict=True) if ok]
        self._logged([c.job_id for c in done], [c.attempt for c in done])
        return oks

    def _logged(self, job_ids: list[str], attempts: list[int]) -> None:
        if not job_ids:
            return
        self._log.write("".join(f"{j} {a} {os.getpid()}\n" for j, a in zip(job_ids, attempts, strict=True)))
        self._log.flush()
        os.fsync(self._log.fileno())


def emit(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


async def main(args: argparse.Namespace) -> int:
    config = Config(
        store_url=f"sqlite:///{args.db}",
        max_batch_size=args.max_batch_size,
        max_queue_delay_ms=0.0,
        job_timeout_s=600.0,
    )
    store = LoggingStore(args.db, args.log)
    service = JobService(config, store, FakeEngine(step_delay_s=args.step_delay_s))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await service.start()
    emit(started=os.getpid())
    params = DecodingParams(max_new_tokens=args.max_new_tokens)
    for i in range(args.submit):
        view = await service.submit(OWNER, [f"job {i}"], params)
        emit(accepted=view.job.id, prompt=f"job {i}")
    if args.submit:
        emit(submitted=args.submit)
    while not stop.is_set():
        if args.exit_when_done and store.count(JobStatus.QUEUED) + store.count(JobStatus.RUNNING) == 0:
            break
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=0.05)
    await service.stop(drain_timeout_s=args.drain_timeout_s)
    emit(stopped=os.getpid())
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", required=True)
    p.add_argument("--log", required=True, help="completions accepted by the store are appended here")
    p.add_argument("--submit", type=int, default=0, help="greedy jobs to submit after start")
    p.add_argument("--max-new-tokens", type=int, default=10)
    p.add_argument("--max-batch-size", type=int, default=4)
    p.add_argument("--step-delay-s", type=float, default=0.02, help="fake engine time per decoder step")
    p.add_argument("--drain-timeout-s", type=float, default=30.0)
    p.add_argument("--exit-when-done", action="store_true", help="exit once nothing is queued or running")
    sys.exit(asyncio.run(main(p.parse_args())))
