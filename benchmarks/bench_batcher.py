"""The serving layer's figures (issue 4), through JobService directly (no HTTP):

  speedup   32 concurrent greedy jobs of 32 new tokens, batcher (max_batch_size 32) against
            max_batch_size 1 on the same server and engine, interleaved and repeated.
  overhead  one job at a time: submit-to-result latency minus the engine call's own time.
  store     10,000 jobs queued (the engine held): submit and position-read latencies (SQLite);
  store_redis  the same on the Redis store, against a throwaway local redis-server (if installed).
  lengths   mixed max_new_tokens (half short: 8/12/16, half long: 64/96/128) with the FakeEngine's
            cost model: group all lengths, cap the spread (factor 2), or only equal lengths.

The first three use the real Engine on a FLAN-T5-small-shaped int8 demo model (random weights),
built once under benchmarks/out/models. Figures are printed and saved to
benchmarks/out/bench_batcher.json.

    .venv/bin/python benchmarks/bench_batcher.py [--sections speedup,overhead,store,store_redis,lengths]
        [--reps 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.config import Config  # noqa: E402
from engine.runtime.params import DecodingParams  # noqa: E402
from engine.runtime.protocols import EngineLike, OnToken  # noqa: E402
from engine.runtime.result import GenerationRequest, Result  # noqa: E402
from engine.serving.service import JobService  # noqa: E402
from engine.serving.store.sqlite import SqliteJobStore  # noqa: E402

OUT = ROOT / "benchmarks" / "out"
PROMPT = (
    "Answer the question about request number {i}: which of the jobs that wait in the queue of the "
    "inference server should run first, and how many of them can share one call to the model?"
)


def pct(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


class TimedEngine:
    """The real engine, recording how long each call takes; optionally held at a gate."""

    def __init__(self, inner: Any, gate: threading.Event | None = None) -> None:
        self.inner = inner
        self.manifest = inner.manifest
        self.gate = gate
        self.call_seconds: list[float] = []

    def tokenize(self, prompts: Sequence[str]) -> list[tuple[int, ...]]:
        return list(self.inner.tokenize(prompts))

    def generate_requests(
        self, requests: Sequence[GenerationRequest], on_token: OnToken | None = None
    ) -> list[Result]:
        if self.gate is not None:
            self.gate.wait()
        t0 = time.perf_counter()
        out = list(self.inner.generate_requests(requests, on_token))
        self.call_seconds.append(time.perf_counter() - t0)
        return out

    def greedy_continuous(self) -> bool:
        return False  # this benchmark measures the batch lane's policy: greedy stays there

    def decoder_batch(self) -> Any:
        return self.inner.decoder_batch()


def load_engine(model_dir: Path) -> Any:
    from engine.model.demo import build_demo_model
    from engine.runtime.engine import Engine

    if not (model_dir / "engine.json").is_file():
        print(f"building the demo model (FLAN-T5-small shapes, int8) in {model_dir} ...", flush=True)
        build_demo_model(model_dir, size="small", seed=0, quantization="int8")
    return Engine(model_dir, device="cpu", compute_type="int8")


async def with_service(engine: EngineLike, db: Path, **config: Any) -> JobService:
    svc = JobService(Config(**config), SqliteJobStore(db), engine)
    await svc.start()
    return svc


# -- speedup ---------------------------------------------------------------------------------------
async def burst(
    engine: EngineLike, db: Path, batch: int, jobs: int, params: DecodingParams
) -> dict[str, Any]:
    svc = await with_service(engine, db, max_batch_size=batch, max_queue_size=100_000)
    t0 = time.perf_counter()
    views = await asyncio.gather(*(svc.submit("bench", [PROMPT.format(i=i)], params) for i in range(jobs)))
    done = await asyncio.gather(*(svc.wait("bench", v.job.id) for v in views))
    wall = time.perf_counter() - t0
    assert all(d.job.status.value == "completed" for d in done), [d.job.error for d in done]
    tokens = sum(d.job.result.usage.completion_tokens for d in done if d.job.result)
    lat = [(d.job.finished_at or 0) - d.job.created_at for d in done]
    await svc.stop()
    return {"wall_s": wall, "tokens": tokens, "latency_p50_s": pct(lat, 50), "latency_max_s": max(lat)}


async def section_speedup(engine: EngineLike, tmp: Path, reps: int) -> dict[str, Any]:
    params = DecodingParams(max_new_tokens=32, min_new_tokens=32)
    runs: dict[str, list[dict[str, Any]]] = {"batched": [], "batch1": []}
    await burst(engine, tmp / "warm.db", 32, 4, params)  # warm-up, not counted
    for rep in range(reps):
        order = [("batched", 32), ("batch1", 1)] if rep % 2 == 0 else [("batch1", 1), ("batched", 32)]
        for name, size in order:
            r = await burst(engine, tmp / f"speedup-{name}-{rep}.db", size, 32, params)
            runs[name].append(r)
            print(f"  rep {rep} {name:8s} wall {r['wall_s']:.2f} s, {r['tokens']} tokens", flush=True)
    med = {k: statistics.median(r["wall_s"] for r in v) for k, v in runs.items()}
    return {
        "runs": runs,
        "median_wall_s": med,
        "speedup": med["batch1"] / med["batched"],
        "tokens_per_s": {k: 32 * 32 / v for k, v in med.items()},
    }


# -- overhead --------------------------------------------------------------------------------------
async def section_overhead(engine: Any, tmp: Path, jobs: int) -> dict[str, Any]:
    timed = TimedEngine(engine)
    params = DecodingParams(max_new_tokens=32, min_new_tokens=32)
    from harness.fakes import FakeEngine

    # The FakeEngine answers at once: its whole latency is the queue path (store, scheduler,
    # worker thread hand-offs, result write).
    instant = TimedEngine(engine)
    instant.inner = FakeEngine()
    services = {
        "delay_0ms": (timed, await with_service(timed, tmp / "overhead0.db", max_queue_delay_ms=0.0)),
        "delay_2ms_default": (
            timed,
            await with_service(timed, tmp / "overhead2.db", max_queue_delay_ms=Config().max_queue_delay_ms),
        ),
        "delay_5ms": (timed, await with_service(timed, tmp / "overhead5.db", max_queue_delay_ms=5.0)),
        "instant_engine_delay_0ms": (
            instant,
            await with_service(instant, tmp / "overhead_fake.db", max_queue_delay_ms=0.0),
        ),
    }
    overhead: dict[str, list[float]] = {k: [] for k in services}
    engine_s: dict[str, list[float]] = {k: [] for k in services}
    for i in range(jobs):
        for name, (eng, svc) in services.items():  # interleaved
            t0 = time.perf_counter()
            view = await svc.submit("bench", [PROMPT.format(i=i)], params)
            await svc.wait("bench", view.job.id)
            latency = time.perf_counter() - t0
            call = eng.call_seconds[-1]
            overhead[name].append(latency - call)
            engine_s[name].append(call)
    for _, svc in services.values():
        await svc.stop()
    return {
        name: {
            "jobs": jobs,
            "overhead_p50_ms": 1000 * pct(v, 50),
            "overhead_p90_ms": 1000 * pct(v, 90),
            "engine_p50_ms": 1000 * pct(engine_s[name], 50),
        }
        for name, v in overhead.items()
    }


# -- store -----------------------------------------------------------------------------------------
FLOOR_WORK_S = 0.0002


def spin(seconds: float) -> float:
    """A fixed CPU-only task timed like a submit: its tail is what the machine's load alone adds
    (on a shared 2-core machine a thread is preempted for milliseconds now and then)."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        pass
    return time.perf_counter() - t0


async def section_store(engine: Any, tmp: Path, queued: int, redis_url: str | None = None) -> dict[str, Any]:
    gate = threading.Event()
    held = TimedEngine(engine, gate=gate)
    if redis_url is None:
        svc = await with_service(held, tmp / "store.db", max_queue_size=queued + 1000)
    else:
        from engine.serving.store.redis import RedisJobStore

        svc = JobService(Config(max_queue_size=queued + 1000), RedisJobStore(redis_url), held)
        await svc.start()
    params = DecodingParams(max_new_tokens=8)
    submit_s: list[float] = []
    submit_cpu_s: list[float] = []  # this thread's CPU time: the wall time less preemption waits
    floor_s: list[float] = []
    ids = []
    for i in range(queued):
        c0, t0 = time.thread_time(), time.perf_counter()
        view = await svc.submit("bench", [PROMPT.format(i=i)], params)
        submit_s.append(time.perf_counter() - t0)
        submit_cpu_s.append(time.thread_time() - c0)
        ids.append(view.job.id)
        floor_s.append(spin(FLOOR_WORK_S))
    depth = svc.queue_depth()
    rng = random.Random(0)
    get_s, get_cpu_s, position_s = [], [], []
    for _ in range(2000):
        job_id = rng.choice(ids)
        c0, t0 = time.thread_time(), time.perf_counter()
        await svc.get("bench", job_id)
        get_s.append(time.perf_counter() - t0)
        get_cpu_s.append(time.thread_time() - c0)
        t0 = time.perf_counter()
        svc.store.position(job_id)
        position_s.append(time.perf_counter() - t0)
    last = ids[-1]
    worst_s = []
    for _ in range(500):  # the last job: its position counts every queued job ahead
        t0 = time.perf_counter()
        await svc.get("bench", last)
        worst_s.append(time.perf_counter() - t0)
    gate.set()
    await svc.stop(drain_timeout_s=0.0)

    def stats(v: list[float]) -> dict[str, float]:
        return {"p50_ms": 1000 * pct(v, 50), "p99_ms": 1000 * pct(v, 99), "max_ms": 1000 * max(v)}

    return {
        "queued": depth,
        "submit_all": stats(submit_s),
        "submit_last_1000": stats(submit_s[-1000:]),
        "submit_cpu_time": stats(submit_cpu_s),
        "get_with_position_cpu_time": stats(get_cpu_s),
        "get_with_position_random": stats(get_s),
        "store_position_random": stats(position_s),
        "get_with_position_last": stats(worst_s),
        "noise_floor_spin": stats(floor_s),
    }


# -- lengths (FakeEngine) --------------------------------------------------------------------------
SHORT = (8, 12, 16)
LONG = (64, 96, 128)


async def lengths_run(ratio: float, seed: int, jobs: int, rate_per_s: float) -> dict[str, Any]:
    from engine.serving.batching import BatchLimits
    from harness.fakes import FakeEngine

    engine = FakeEngine(step_delay_s=0.004, row_delay_s=0.0004)
    svc = JobService(Config(max_queue_delay_ms=5.0), SqliteJobStore(":memory:"), engine)
    svc.limits = BatchLimits(32, 16_384, 0.005, max_new_tokens_ratio=ratio)
    await svc.start()
    rng = random.Random(seed)
    waits = []
    t_start = time.perf_counter()

    async def one(i: int, n: int) -> tuple[int, float]:
        t0 = time.perf_counter()
        v = await svc.submit("bench", [f"job {i}"], DecodingParams(max_new_tokens=n))
        await svc.wait("bench", v.job.id)
        return n, time.perf_counter() - t0

    for i in range(jobs):
        n = rng.choice(SHORT if rng.random() < 0.5 else LONG)
        waits.append(asyncio.create_task(one(i, n)))
        await asyncio.sleep(rng.expovariate(rate_per_s))
    results = await asyncio.gather(*waits)
    makespan = time.perf_counter() - t_start
    await svc.stop()
    short = [t for n, t in results if n in SHORT]
    long = [t for n, t in results if n in LONG]
    return {
        "short_p50_s": pct(short, 50),
        "short_p90_s": pct(short, 90),
        "long_p50_s": pct(long, 50),
        "long_p90_s": pct(long, 90),
        "makespan_s": makespan,
        "engine_calls": len(engine.calls),
    }


async def section_lengths(reps: int) -> dict[str, Any]:
    policies = {"group_all": 0.0, "spread_2x": 2.0, "equal_only": 1.0}
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in policies}
    for rep in range(reps):
        for name, ratio in policies.items():  # interleaved; same arrivals per rep
            r = await lengths_run(ratio, seed=rep, jobs=150, rate_per_s=40.0)
            runs[name].append(r)
            print(
                f"  rep {rep} {name:10s} short p50 {r['short_p50_s']:.3f} s, long p50 "
                f"{r['long_p50_s']:.3f} s, makespan {r['makespan_s']:.2f} s",
                flush=True,
            )
    summary = {
        name: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for name, rs in runs.items()
    }
    return {"runs": runs, "median": summary}


# -- main ------------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "load_avg_1m_at_start": os.getloadavg()[0]}


async def main(args: argparse.Namespace) -> int:
    sections = set(args.sections.split(","))
    out: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine()}
    print(f"{out['date']}  {out['machine']}", flush=True)
    engine: Any = None
    if sections & {"speedup", "overhead", "store"}:
        engine = load_engine(Path(args.model_dir))
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if "speedup" in sections:
            print("speedup: 32 concurrent greedy jobs x 32 new tokens", flush=True)
            out["speedup"] = await section_speedup(engine, tmp, args.reps)
        if "overhead" in sections:
            print("overhead: one job at a time", flush=True)
            out["overhead"] = await section_overhead(engine, tmp, args.overhead_jobs)
        if "store" in sections:
            print(f"store: {args.queued} jobs queued", flush=True)
            out["store"] = await section_store(engine, tmp, args.queued)
        if "store_redis" in sections:
            import shutil

            from harness.processes import redis_server

            if shutil.which("redis-server") is None:
                print("store_redis: skipped, redis-server is not installed", flush=True)
            else:
                print(f"store_redis: {args.queued} jobs queued in a local redis-server", flush=True)
                with redis_server(tmp) as url:
                    out["store_redis"] = await section_store(engine, tmp, args.queued, url)
    if "lengths" in sections:
        print("lengths: mixed max_new_tokens 8-16 / 64-128 (FakeEngine cost model)", flush=True)
        out["lengths"] = await section_lengths(args.reps)
    out["machine"]["load_avg_1m_at_end"] = os.getloadavg()[0]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "bench_batcher.json").write_text(json.dumps(out, indent=2))
    print_tables(out)
    return 0


def print_tables(out: dict[str, Any]) -> None:
    print()
    print("| figure | value | target |")
    print("|---|---|---|")
    if "speedup" in out:
        s = out["speedup"]
        med = s["median_wall_s"]
        print(f"| 32 jobs x 32 tokens, max_batch_size 1 (median wall) | {med['batch1']:.2f} s | |")
        print(f"| 32 jobs x 32 tokens, batcher (median wall) | {med['batched']:.2f} s | |")
        print(f"| speedup | {s['speedup']:.1f}x | >= 3x |")
    if "overhead" in out:
        for name, o in out["overhead"].items():
            print(
                f"| queue path over engine time, {name} (p50 / p90; engine p50 {o['engine_p50_ms']:.0f} ms) "
                f"| {o['overhead_p50_ms']:.2f} / {o['overhead_p90_ms']:.2f} ms | <= 5 ms p50 |"
            )
    for section in ("store", "store_redis"):
        if section not in out:
            continue
        st = out[section]
        for key in (
            "submit_all",
            "submit_last_1000",
            "submit_cpu_time",
            "get_with_position_random",
            "get_with_position_cpu_time",
            "get_with_position_last",
            "noise_floor_spin",
        ):
            v = st[key]
            print(
                f"| {section}: {key} with {st['queued']} queued (p50 / p99 / max) | {v['p50_ms']:.3f} / "
                f"{v['p99_ms']:.3f} / {v['max_ms']:.2f} ms | < 2 ms p99 |"
            )
    if "lengths" in out:
        print()
        print(
            "| max_new_tokens policy | short p50 | short p90 | long p50 | long p90 | makespan | engine calls |"
        )
        print("|---|---|---|---|---|---|---|")
        for name, m in out["lengths"]["median"].items():
            print(
                f"| {name} | {m['short_p50_s']:.3f} s | {m['short_p90_s']:.3f} s | {m['long_p50_s']:.3f} s "
                f"| {m['long_p90_s']:.3f} s | {m['makespan_s']:.2f} s | {m['engine_calls']:.0f} |"
            )
    print(
        f"\nload average (1 min): {out['machine']['load_avg_1m_at_start']:.2f} at start, "
        f"{out['machine']['load_avg_1m_at_end']:.2f} at end"
    )


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default="speedup,overhead,store,store_redis,lengths")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--overhead-jobs", type=int, default=30)
    p.add_argument("--queued", type=int, default=10_000)
    p.add_argument("--model-dir", default=str(OUT / "models" / "demo-small"))
    sys.exit(asyncio.run(main(p.parse_args())))
