"""What the REST submit-and-poll path adds over the job's own time in the server, at 50 concurrent
clients, and whether the server answers every request without a 5xx.

Target (issue 5): **the REST submit-and-poll path adds at most 10 ms p50 over the engine's own
time at 50 concurrent clients, and the server answers every one of 2,000 requests with no 5xx.**

Method: `engine serve` runs as a subprocess on a FLAN-T5-small-shaped int8 demo model (random
weights, real shapes); 50 clients (closed loop, benchmarks/loadgen.py) send greedy jobs of 16
forced new tokens. For every job the client measures submit-to-completion; the server's own time
for the same job is ``finished_at - created_at`` (stamped by the job service when it accepted the
job and when the engine's result was stored, read back over gRPC afterwards). The difference is
what the transport adds: HTTP parsing, auth, transcoding, the poll that notices completion, and
the answer. Four ways of waiting run interleaved, in rounds, on the same server:
  rest-long   POST, then GET ?wait=30 (long poll: answered the moment the job is done)
  rest-20ms   POST, then the seed's loop: GET, sleep 20 ms, GET, ... (what seed clients do)
  grpc        one unary Generate call (the gRPC path, no polling)
  httpx-long  rest-long with httpx as the client instead of loadgen's light keep-alive client
The load generator runs on the same machine as the server: its own CPU time is counted in the
client's latency (httpx-long shows how much a heavier client adds).

    python benchmarks/bench_api.py                 # 4 rounds x 500 jobs per mode
    python benchmarks/bench_api.py --rounds 1 --jobs 100   # quick look
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.loadgen import (  # noqa: E402
    Outcome,
    Summary,
    closed_loop,
    grpc_generate,
    percentile,
    raw_submit_and_poll,
    rest_submit_and_poll,
    run_client,
    summarize,
)

OUT = ROOT / "benchmarks" / "out"
MODEL_DIR = OUT / "models" / "demo-small-int8"
PROMPT = "A step by step recipe to make bolognese pasta:"
PARAMS = {"max_new_tokens": 16, "min_new_tokens": 16}
MODES = ("rest-long", "rest-20ms", "grpc", "httpx-long")


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return platform.processor()
    for line in out.splitlines():
        if line.startswith("Model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


def ensure_model() -> Path:
    if not (MODEL_DIR / "engine.json").is_file():
        from engine.model.demo import build_demo_model

        print(f"building the demo model at {MODEL_DIR} (FLAN-T5-small shapes, int8)...", flush=True)
        build_demo_model(MODEL_DIR, size="small", seed=0, quantization="int8", force=MODEL_DIR.exists())
    return MODEL_DIR


async def server_times(grpc_target: str, key: str, job_ids: list[str]) -> dict[str, tuple[float, float]]:
    """(created_at, finished_at) per job, as the job service stamped them (wall clock)."""
    import grpc

    from engine.api.pb import engine_pb2, engine_pb2_grpc

    out: dict[str, tuple[float, float]] = {}
    async with grpc.aio.insecure_channel(grpc_target) as channel:
        stub = engine_pb2_grpc.EngineStub(channel)
        sem = asyncio.Semaphore(32)

        async def one(job_id: str) -> None:
            async with sem:
                job = await stub.GetResult(
                    engine_pb2.GetResultRequest(id=job_id), metadata=(("apikey", key),)
                )
            if job.finished_at and job.created_at:
                out[job_id] = (job.created_at, job.finished_at)

        await asyncio.gather(*(one(j) for j in job_ids))
    return out


async def _asgi_call(
    app: Any, method: str, path: str, headers: dict[str, str], body: bytes = b""
) -> tuple[int, bytes]:
    """One request straight into the ASGI app: no sockets, no client, only the shim's own work."""
    sent: list[dict[str, Any]] = []
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 8080),
    }
    await app(scope, receive, send)
    return int(sent[0]["status"]), bytes(sent[1]["body"])


async def shim_cpu_per_job(reps: int = 5, jobs: int = 300) -> dict[str, float]:
    """CPU time of one submit + one poll through the REST shim, against calling the gRPC servicer's
    core directly, over the same fake job service (so the job service's own work is the same in
    both and cancels out). Interleaved, repeated; medians."""
    from engine.api.client import InProcessClient
    from engine.api.pb import engine_pb2
    from engine.api.rest import create_app
    from harness.api_fakes import fake_stack

    body = json.dumps({"prompt": PROMPT, "params": PARAMS}).encode()
    rest_ms: list[float] = []
    core_ms: list[float] = []
    for _ in range(reps):
        for mode in ("rest", "core"):
            tmp = tempfile.mkdtemp(prefix="bench-shim-")
            stack = fake_stack(f"{tmp}/keys.db", max_queue_size=10**9)
            app = create_app(InProcessClient(stack.servicer), stack.metrics)
            headers = {"apiKey": stack.alice, "content-type": "application/json"}
            req = engine_pb2.SubmitRequest(prompts=[PROMPT])
            req.params.update(PARAMS)
            t0 = time.process_time()
            for _ in range(jobs):
                if mode == "rest":
                    status, raw = await _asgi_call(app, "POST", "/v1/submit", headers, body)
                    job_id = json.loads(raw)["data"]["id"]
                    status, _ = await _asgi_call(app, "GET", f"/v1/response/{job_id}", headers)
                    assert status == 200
                else:
                    job = await stack.servicer.submit(stack.alice, req)
                    await stack.servicer.get_result(stack.alice, engine_pb2.GetResultRequest(id=job.id))
            elapsed_ms = (time.process_time() - t0) * 1000 / jobs
            (rest_ms if mode == "rest" else core_ms).append(elapsed_ms)
            await stack.service.close()
            stack.keys.close()
    rest, core = statistics.median(rest_ms), statistics.median(core_ms)
    return {"rest_ms_per_job": rest, "core_ms_per_job": core, "shim_adds_ms_per_job": rest - core}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from harness.processes import create_key_cli, start_server

    shim = await shim_cpu_per_job()
    print(
        f"REST shim CPU per job (submit + poll, in process, fake service): {shim['rest_ms_per_job']:.3f} ms; "
        f"the servicer core alone: {shim['core_ms_per_job']:.3f} ms; the shim adds {shim['shim_adds_ms_per_job']:.3f} ms",
        flush=True,
    )
    model = ensure_model()
    tmp = Path(tempfile.mkdtemp(prefix="bench-api-"))
    store = f"sqlite:///{tmp}/engine.db"
    key = create_key_cli(store, "bench")
    load_before = load_average()
    server = start_server(
        ["--model", str(model), "--store", store, "--rate-limit-per-minute", "0"], tmp / "server.log"
    )
    print(
        f"server ready on {server.url} / {server.grpc_target}; load average before: {load_before}", flush=True
    )
    results: dict[str, list[Outcome]] = {m: [] for m in MODES}
    rounds: list[dict[str, Any]] = []
    try:
        import grpc

        from engine.api.pb import engine_pb2_grpc

        limits = httpx.Limits(
            max_connections=args.concurrency + 10, max_keepalive_connections=args.concurrency + 10
        )
        async with (
            httpx.AsyncClient(base_url=server.url, limits=limits, timeout=httpx.Timeout(300.0)) as http,
            grpc.aio.insecure_channel(server.grpc_target) as channel,
        ):
            body = {"prompt": PROMPT, "params": PARAMS}
            long_fn, close_long = raw_submit_and_poll(server.url, key, body, concurrency=args.concurrency)
            poll_fn, close_poll = raw_submit_and_poll(
                server.url, key, body, concurrency=args.concurrency, poll="0.02"
            )
            fns = {
                "rest-long": long_fn,
                "rest-20ms": poll_fn,
                "grpc": grpc_generate(engine_pb2_grpc.EngineStub(channel), key, [PROMPT], PARAMS),
                "httpx-long": rest_submit_and_poll(http, key, body, poll="long"),
            }
            await closed_loop(
                fns["rest-long"], concurrency=args.concurrency, total=args.concurrency * 2
            )  # warm-up
            for r in range(args.rounds):
                order = MODES if r % 2 == 0 else tuple(reversed(MODES))
                for mode in order:
                    outcomes = await closed_loop(fns[mode], concurrency=args.concurrency, total=args.jobs)
                    results[mode].extend(outcomes)
                    round_summary = summarize(outcomes)
                    rounds.append({"round": r, "mode": mode, "summary": asdict(round_summary)})
                    print(
                        f"round {r} {mode:<10} {round_summary.requests} jobs, {round_summary.server_errors} 5xx, "
                        f"p50 {round_summary.p50_ms:.1f} ms, {round_summary.throughput_per_s:.1f} jobs/s",
                        flush=True,
                    )
            await close_long()
            await close_poll()
        all_ids = [o.job_id for outs in results.values() for o in outs if o.ok and o.job_id]
        times = await server_times(server.grpc_target, key, all_ids)
    finally:
        code = server.stop()
        if code != 0:
            print(server.log()[-3000:], file=sys.stderr)
    load_after = load_average()

    table: dict[str, dict[str, Any]] = {}
    for mode, outs in results.items():
        s: Summary = summarize(outs)
        ok = [(o, times[o.job_id]) for o in outs if o.ok and o.job_id in times]
        server_ms = [(fin - created) * 1000 for _, (created, fin) in ok]
        overhead_ms = [o.latency_s * 1000 - (fin - created) * 1000 for o, (created, fin) in ok]
        # Where the added time goes: before the service accepted the job, after it finished it.
        before_ms = [(created - o.wall_start) * 1000 for o, (created, _) in ok]
        after_ms = [(o.wall_end - fin) * 1000 for o, (_, fin) in ok]
        per_round = [r["summary"]["throughput_per_s"] for r in rounds if r["mode"] == mode]
        table[mode] = {
            "summary": asdict(s),
            "jobs_per_s_median_round": statistics.median(per_round),
            "server_p50_ms": percentile(server_ms, 50),
            "before_accept_p50_ms": percentile(before_ms, 50),
            "after_finish_p50_ms": percentile(after_ms, 50),
            "overhead_p50_ms": percentile(overhead_ms, 50),
            "overhead_p90_ms": percentile(overhead_ms, 90),
            "overhead_p99_ms": percentile(overhead_ms, 99),
            "overhead_mean_ms": statistics.fmean(overhead_ms),
        }
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": cpu_model(),
        "cores": os.cpu_count(),
        "load_before": load_before,
        "load_after": load_after,
        "concurrency": args.concurrency,
        "rounds": args.rounds,
        "jobs_per_round": args.jobs,
        "params": PARAMS,
        "table": table,
        "shim_cpu": shim,
        "per_round": rounds,
    }


def render(report: dict[str, Any]) -> str:
    lines = [
        f"{'mode':<10} {'jobs':>5} {'5xx':>4} {'jobs/s':>7} {'client p50':>11} {'p99':>8} "
        f"{'server p50':>11} {'added p50':>10} {'added p90':>10} {'added p99':>10} {'polls':>6} "
        f"{'before':>8} {'after':>8}",
    ]
    lines.append("-" * len(lines[0]))
    for mode, row in report["table"].items():
        s = row["summary"]
        lines.append(
            f"{mode:<10} {s['requests']:>5} {s['server_errors']:>4} {row['jobs_per_s_median_round']:>7.1f} "
            f"{s['p50_ms']:>8.1f} ms {s['p99_ms']:>5.0f} ms {row['server_p50_ms']:>8.1f} ms "
            f"{row['overhead_p50_ms']:>7.1f} ms {row['overhead_p90_ms']:>7.1f} ms {row['overhead_p99_ms']:>7.1f} ms "
            f"{s['mean_polls']:>6.1f} {row['before_accept_p50_ms']:>5.1f} ms {row['after_finish_p50_ms']:>5.1f} ms"
        )
    lines.append(
        "(added = client latency - the job's time in the job service; before/after = p50 of the part "
        "before the service accepted the job and after it finished it)"
    )
    shim = report["shim_cpu"]
    lines.append(
        f"REST shim's own CPU per job (submit + poll, no sockets, fake job service): {shim['rest_ms_per_job']:.3f} ms "
        f"against {shim['core_ms_per_job']:.3f} ms for the servicer core alone: the shim adds "
        f"{shim['shim_adds_ms_per_job']:.3f} ms"
    )
    long = report["table"]["rest-long"]
    verdict = (
        f"target: REST adds <= 10 ms p50 at {report['concurrency']} clients -> "
        f"{long['overhead_p50_ms']:.1f} ms ({'met' if long['overhead_p50_ms'] <= 10 else 'NOT met'}); "
        f"{long['summary']['requests']} REST requests, {long['summary']['server_errors']} 5xx "
        f"({'met' if long['summary']['server_errors'] == 0 and long['summary']['requests'] >= 2000 else 'NOT met'})"
    )
    return "\n".join([*lines, "", verdict])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, default=50)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--jobs", type=int, default=500, help="jobs per mode per round")
    p.add_argument("--append-results", action="store_true", help="append a section to benchmarks/RESULTS.md")
    args = p.parse_args()
    report = run_client(run(args))
    text = render(report)
    print()
    print(text)
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "bench_api.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"\nsaved {path}")
    if args.append_results:
        cmd = "python benchmarks/bench_api.py " + " ".join(sys.argv[1:])
        section = (
            f"\n## API: REST submit-and-poll overhead (bench_api.py)\n\n"
            f"- date: {report['date']}; machine: {report['machine']} ({report['cores']} cores, shared)\n"
            f"- load average before / after: {report['load_before']} / {report['load_after']}\n"
            f"- command: `{cmd.strip()}`\n"
            f"- model: FLAN-T5-small-shaped int8 demo model (random weights), greedy, "
            f"{PARAMS['max_new_tokens']} forced new tokens, {report['concurrency']} closed-loop clients, "
            f"{report['rounds']} interleaved rounds x {report['jobs_per_round']} jobs per mode\n"
            f"- 'server' = the job's own time in the server (finished_at - created_at); "
            f"'added' = client latency minus that, per job\n\n"
            f"```\n{text}\n```\n"
        )
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as f:
            f.write(section)
        print("appended to benchmarks/RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
