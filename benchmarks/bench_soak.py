"""A bounded soak: two servers on one Redis, a flooding key and a quiet key, kill -9 every 2 minutes.

What it shows (issue 11, "Show it"):
- accepted jobs lost: every submit answered 200 is read back from the store after the run; a job
  lost is one the store does not hold as completed (must be 0);
- run twice: the store's count of results written per job (``ends`` in the job's hash, set by
  the completion script) must be 1 for every job, whatever server ran it and however often
  it was re-run after a kill (``attempts`` > 1 counts those re-runs);
- 5xx outside the kill windows: 0 (a window is from the kill to the restarted server's ready
  line plus the lease, during which clients move to the other server);
- the quiet key's p99 latency with the flood against its p99 alone (target: within 2x);
- RSS of the server that is never killed, and of Redis, at the start and end of the flood.

Method: ``engine serve`` twice as subprocesses on one redis-server (loopback, throwaway, store
URL ``?lease_s=5`` so a killed server's jobs are re-run within 5 s), the FLAN-T5-small-shaped int8
demo model, greedy jobs of 8 forced new tokens. Clients (one process, asyncio, httpx) use REST
submit + long poll, each on a server of its own and on the other one when its server does not
answer. The quiet key's clients (5) keep one job each in flight; the flooding key's clients (45)
submit bursts of 8 and then wait for them. First the quiet key runs alone (``--baseline-s``),
then both with server 2 killed -9 and restarted every ``--kill-every-s``, for ``--duration-s``.
Then nobody submits and every accepted job is waited for (``--drain-s``).

    python benchmarks/bench_soak.py                      # 10 minutes, as issue 11 asks
    python benchmarks/bench_soak.py --duration-s 240     # shorter: two kills
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import OUT_DIR, machine, save_json  # noqa: E402
from benchmarks.loadgen import percentile  # noqa: E402
from harness.processes import ServerProcess, create_key_cli, redis_server, start_server  # noqa: E402

MODEL_DIR = OUT_DIR / "models" / "demo-small-int8"
PROMPT = "A step by step recipe to make bolognese pasta:"
BODY = {"prompt": PROMPT, "params": {"max_new_tokens": 8, "min_new_tokens": 8}}
LEASE_S = 5.0
PREFIX = "engine:jobs:"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def ensure_model() -> Path:
    if not (MODEL_DIR / "engine.json").is_file():
        from engine.model.demo import build_demo_model

        print(f"building the demo model at {MODEL_DIR} (FLAN-T5-small shapes, int8)...", flush=True)
        build_demo_model(MODEL_DIR, size="small", seed=0, quantization="int8", force=MODEL_DIR.exists())
    return MODEL_DIR


class Server:
    """One ``engine serve`` that the run kills -9 and starts again (on new free ports)."""

    def __init__(self, name: str, args: list[str], folder: Path) -> None:
        self.name = name
        self.args = args
        self.folder = folder
        self.process: ServerProcess | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        assert self.process is not None
        return self.process.url

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.proc.pid

    def start(self) -> None:
        self.starts += 1
        log = self.folder / f"{self.name}-{self.starts}.log"
        # This checkout's engine, whatever is installed in the environment.
        self.process = start_server(self.args, log, environ={**os.environ, "PYTHONPATH": str(ROOT)})

    def kill9(self) -> None:
        if self.process is not None and self.process.proc.poll() is None:
            self.process.proc.send_signal(signal.SIGKILL)
            self.process.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(timeout_s=30)


@dataclass
class Record:
    accepted: set[str] = field(default_factory=set)
    # phase -> (completion time, seconds, job id) of the quiet key's jobs
    latencies: dict[str, list[tuple[float, float, str]]] = field(default_factory=dict)
    server_errors: list[tuple[float, int, str]] = field(default_factory=list)  # (time, status, route)
    unreachable: int = 0  # connection refused / reset: a killed server
    rejected_429: int = 0
    failed_jobs: int = 0


class Client:
    def __init__(self, key: str, servers: list[Server], first: int, rec: Record, stop: asyncio.Event) -> None:
        self.key = key
        self.servers = servers
        self.at = first
        self.rec = rec
        self.stop = stop

    def _switch(self) -> None:
        self.at = (self.at + 1) % len(self.servers)

    async def _call(
        self, http: httpx.AsyncClient, method: str, path: str, **kw: Any
    ) -> httpx.Response | None:
        """One request on this client's server; None (and the next server) when it does not answer."""
        try:
            r = await http.request(
                method, self.servers[self.at].url + path, headers={"apiKey": self.key}, **kw
            )
        except httpx.TransportError:
            self.rec.unreachable += 1
            self._switch()
            await asyncio.sleep(0.2)
            return None
        if r.status_code >= 500:
            self.rec.server_errors.append((time.time(), r.status_code, f"{method} {path.split('?')[0][:12]}"))
            self._switch()
            await asyncio.sleep(0.2)
            return None
        return r

    async def submit(self, http: httpx.AsyncClient) -> str | None:
        while not self.stop.is_set():
            r = await self._call(http, "POST", "/v1/submit", json=BODY)
            if r is None:
                continue
            if r.status_code == 429:
                self.rec.rejected_429 += 1
                await asyncio.sleep(float(r.headers.get("Retry-After", "1")))
                continue
            r.raise_for_status()
            job_id = str(r.json()["data"]["id"])
            self.rec.accepted.add(job_id)
            return job_id
        return None

    async def wait(self, http: httpx.AsyncClient, job_id: str) -> bool:
        """Until the job ended; True when it completed."""
        while True:
            r = await self._call(http, "GET", f"/v1/response/{job_id}?wait=10")
            if r is None:
                continue
            if r.status_code != 200:
                self.rec.failed_jobs += 1
                return False
            data = r.json()["data"]
            if data["completion"] is not None:
                return True
            if data["status"] in ("failed", "cancelled"):
                self.rec.failed_jobs += 1
                return False

    async def quiet(self, http: httpx.AsyncClient, phase: str) -> None:
        while not self.stop.is_set():
            start = time.perf_counter()
            job_id = await self.submit(http)
            if job_id is None:
                return
            if await self.wait(http, job_id):
                self.rec.latencies.setdefault(phase, []).append(
                    (time.time(), time.perf_counter() - start, job_id)
                )

    async def flood(self, http: httpx.AsyncClient, burst: int) -> None:
        while not self.stop.is_set():
            ids = [job_id for _ in range(burst) if (job_id := await self.submit(http)) is not None]
            for job_id in ids:
                await self.wait(http, job_id)


async def run_clients(
    keys: dict[str, str],
    servers: list[Server],
    rec: Record,
    seconds: float,
    *,
    flood: int,
    quiet: int,
    phase: str,
    killer: Any = None,
) -> None:
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=2.0), limits=limits) as http:
        tasks = [
            asyncio.create_task(Client(keys["quiet"], servers, i % 2, rec, stop).quiet(http, phase))
            for i in range(quiet)
        ]
        tasks += [
            asyncio.create_task(Client(keys["flood"], servers, i % 2, rec, stop).flood(http, 8))
            for i in range(flood)
        ]
        if killer is not None:
            tasks.append(asyncio.create_task(killer(stop)))
        await asyncio.sleep(seconds)
        stop.set()
        await asyncio.wait(tasks, timeout=120)


def store_audit(redis_port: int, ids: set[str]) -> dict[str, int]:
    import redis

    r = redis.Redis(port=redis_port, decode_responses=True)
    pipe = r.pipeline(transaction=False)
    for job_id in ids:
        pipe.hmget(f"{PREFIX}job:{job_id}", "status", "ends", "attempts")
    counts = {"completed": 0, "failed": 0, "other": 0, "missing": 0, "ends_not_1": 0, "rerun": 0}
    for status, ends, attempts in pipe.execute():
        if status is None:
            counts["missing"] += 1
            continue
        counts[status if status in ("completed", "failed") else "other"] += 1
        if status == "completed" and ends != "1":
            counts["ends_not_1"] += 1
        if attempts is not None and int(attempts) > 1:
            counts["rerun"] += 1
    return counts


def job_times(redis_port: int, ids: list[str]) -> list[tuple[float, float]]:
    """(created_at, finished_at) of each job, as the servers stamped them."""
    import redis

    pipe = redis.Redis(port=redis_port, decode_responses=True).pipeline(transaction=False)
    for job_id in ids:
        pipe.hmget(f"{PREFIX}job:{job_id}", "created_at", "finished_at")
    return [(float(a), float(b)) for a, b in pipe.execute() if a is not None and b is not None]


def redis_rss_mib(redis_port: int) -> float:
    import redis

    return int(redis.Redis(port=redis_port).info("memory")["used_memory_rss"]) / (1024 * 1024)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration-s", type=float, default=600.0, help="the flood with kills (issue 11: 600)")
    p.add_argument("--kill-every-s", type=float, default=120.0)
    p.add_argument("--baseline-s", type=float, default=30.0, help="the quiet key alone, first")
    p.add_argument("--drain-s", type=float, default=180.0, help="longest wait for accepted jobs at the end")
    p.add_argument("--flood-clients", type=int, default=45)
    p.add_argument("--quiet-clients", type=int, default=5)
    p.add_argument("--server-args", default="", help="more engine serve flags for both servers")
    args = p.parse_args()

    model = ensure_model()
    folder = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    with redis_server(folder) as redis_url:
        redis_port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
        store = f"{redis_url}?lease_s={LEASE_S:g}"
        keys = {"flood": create_key_cli(store, "flood"), "quiet": create_key_cli(store, "quiet")}
        serve = [
            "--model",
            str(model),
            "--store",
            store,
            "--rate-limit-per-minute",
            "0",
            *args.server_args.split(),
        ]
        steady, victim = Server("server1", serve, folder), Server("server2", serve, folder)
        servers = [steady, victim]
        for s in servers:
            s.start()
        rec = Record()
        windows: list[tuple[float, float]] = []
        try:
            print(f"baseline: the quiet key alone for {args.baseline_s:g} s", flush=True)
            asyncio.run(
                run_clients(
                    keys, servers, rec, args.baseline_s, flood=0, quiet=args.quiet_clients, phase="alone"
                )
            )
            rss_start = (rss_mib(steady.pid), redis_rss_mib(redis_port))

            async def killer(stop: asyncio.Event) -> None:
                while not stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), args.kill_every_s)
                    if stop.is_set():
                        return
                    killed = time.time()
                    victim.kill9()
                    print(f"  {time.strftime('%H:%M:%S')} kill -9 server2; restarting", flush=True)
                    await asyncio.to_thread(victim.start)
                    windows.append((killed, time.time() + LEASE_S + 2.0))

            print(
                f"flood: {args.flood_clients} flooding + {args.quiet_clients} quiet clients for "
                f"{args.duration_s:g} s, server2 killed -9 every {args.kill_every_s:g} s",
                flush=True,
            )
            asyncio.run(
                run_clients(
                    keys,
                    servers,
                    rec,
                    args.duration_s,
                    flood=args.flood_clients,
                    quiet=args.quiet_clients,
                    phase="flood",
                    killer=killer,
                )
            )
            rss_end = (rss_mib(steady.pid), redis_rss_mib(redis_port))
            deadline = time.monotonic() + args.drain_s
            while True:
                audit = store_audit(redis_port, rec.accepted)
                if audit["other"] == 0 or time.monotonic() > deadline:
                    break
                time.sleep(2)
            server_times = {
                phase: job_times(redis_port, [job_id for _, _, job_id in rows])
                for phase, rows in rec.latencies.items()
            }
        finally:
            for s in servers:
                s.stop()

    def in_window(t: float) -> bool:
        return any(a <= t <= b for a, b in windows)

    outside = [e for e in rec.server_errors if not in_window(e[0])]
    alone = [s for _, s, _ in rec.latencies.get("alone", [])]
    flood = [s for _, s, _ in rec.latencies.get("flood", [])]
    flood_calm = [s for t, s, _ in rec.latencies.get("flood", []) if not in_window(t)]
    # The scheduler's part of each: accepted (created_at) to result stored (finished_at).
    in_server = {phase: [b - a for a, b in server_times.get(phase, [])] for phase in ("alone", "flood")}
    p99_server = {phase: percentile(v, 99) if v else float("nan") for phase, v in in_server.items()}
    p50_alone = percentile(alone, 50) if alone else float("nan")
    p50_flood = percentile(flood, 50) if flood else float("nan")
    p99_alone = percentile(alone, 99) if alone else float("nan")
    p99_flood = percentile(flood, 99) if flood else float("nan")
    p99_calm = percentile(flood_calm, 99) if flood_calm else float("nan")
    lost = audit["missing"] + audit["other"] + audit["failed"]
    lines = [
        f"accepted jobs: {len(rec.accepted)}; completed in the store: {audit['completed']}; "
        f"lost: {lost} (missing {audit['missing']}, not finished {audit['other']}, failed {audit['failed']})",
        f"results written more than once (run twice): {audit['ends_not_1']}; jobs re-run after a kill: {audit['rerun']}",
        f"5xx outside the kill windows: {len(outside)} (inside: {len(rec.server_errors) - len(outside)}); "
        f"requests to a dead server: {rec.unreachable}; 429: {rec.rejected_429}; kills: {len(windows)}",
        f"quiet key p99: alone {p99_alone * 1000:.0f} ms ({len(alone)} jobs), with the flood "
        f"{p99_flood * 1000:.0f} ms ({len(flood)} jobs; {p99_flood / p99_alone:.2f}x), outside kill windows "
        f"{p99_calm * 1000:.0f} ms ({p99_calm / p99_alone:.2f}x); p50 alone {p50_alone * 1000:.0f} ms, "
        f"with the flood {p50_flood * 1000:.0f} ms",
        f"quiet key p99 in the server (accepted to result stored): alone {p99_server['alone'] * 1000:.0f} ms, "
        f"with the flood {p99_server['flood'] * 1000:.0f} ms ({p99_server['flood'] / p99_server['alone']:.2f}x)",
        f"RSS server1 (never killed): {rss_start[0]:.0f} MiB at the flood's start, {rss_end[0]:.0f} MiB at its end; "
        f"Redis: {rss_start[1]:.0f} -> {rss_end[1]:.0f} MiB",
    ]
    for line in lines:
        print(line)
    path = save_json(
        "soak",
        {
            "machine": machine(),
            "args": vars(args),
            "audit": audit,
            "accepted": len(rec.accepted),
            "lost": lost,
            "server_errors_outside_windows": outside,
            "server_errors_total": len(rec.server_errors),
            "kill_windows": windows,
            "p99_alone_s": p99_alone,
            "p99_flood_s": p99_flood,
            "p99_flood_outside_windows_s": p99_calm,
            "p99_in_server_s": p99_server,
            "rss_mib_start": rss_start,
            "rss_mib_end": rss_end,
            "quiet_latencies_s": rec.latencies,
            "summary": lines,
        },
    )
    print(f"saved {path}")
    return 0 if lost == 0 and audit["ends_not_1"] == 0 and not outside else 1


if __name__ == "__main__":
    raise SystemExit(main())
