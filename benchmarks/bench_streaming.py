"""Time to first token and tokens/s over server-sent events, against the seed's poll loop on the
same jobs, at 1 and 16 concurrent clients.

Method: `engine serve` runs as a subprocess on a FLAN-T5-small-shaped int8 demo model (random
weights, real shapes). Every job is the same: one prompt, greedy, 48 new tokens forced. Two ways
of running it, interleaved in rounds on the same server (closed loop, N clients):
  sse    POST /v1/completions with stream: true (OpenAI's route): time to first token is when the
         first chunk with text arrives; the job ends at ``data: [DONE]``
  poll   the seed's loop: POST /v1/submit, then GET /v1/response/{id}, sleep 20 ms, GET, ... : the
         first text a client sees is the whole completion, so its time to first token is the
         job's whole time
  long   the seed's API with a long poll: POST /v1/submit, then GET /v1/response/{id}?wait=30,
         answered the moment the job is done (no polling traffic: it separates what streaming
         saves from what the 20 ms loop's own requests cost the shared cores)
Both use httpx with keep-alive connections. Tokens/s is the generated tokens of a phase over its
wall time (all clients together).

    python benchmarks/bench_streaming.py                  # 3 rounds, 12 jobs at 1 client, 64 at 16
    python benchmarks/bench_streaming.py --rounds 1       # quick look
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine, save_json, table  # noqa: E402
from benchmarks.loadgen import percentile  # noqa: E402

MODEL_DIR = ROOT / "benchmarks" / "out" / "models" / "demo-small-int8"
PROMPT = "A step by step recipe to make bolognese pasta:"
NEW_TOKENS = 48
POLL_SLEEP_S = 0.02
MODES = ("sse", "poll", "long")


@dataclass(frozen=True)
class Outcome:
    ttft_s: float  # until the client had the first generated text
    total_s: float  # until the client had the whole completion
    tokens: int


def ensure_model() -> Path:
    if not (MODEL_DIR / "engine.json").is_file():
        from engine.model.demo import build_demo_model

        print(f"building the demo model at {MODEL_DIR} (FLAN-T5-small shapes, int8)...", flush=True)
        build_demo_model(MODEL_DIR, size="small", seed=0, quantization="int8", force=MODEL_DIR.exists())
    return MODEL_DIR


async def sse_job(http: httpx.AsyncClient, key: str) -> Outcome:
    body = {
        "prompt": PROMPT,
        "max_tokens": NEW_TOKENS,
        "min_tokens": NEW_TOKENS,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    first = None
    tokens = 0
    async with http.stream(
        "POST", "/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}
    ) as r:
        if r.status_code != 200:
            raise RuntimeError(f"SSE request answered {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and any(c.get("text") for c in chunk.get("choices", [])):
                first = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    total = time.perf_counter() - t0
    return Outcome(first if first is not None else total, total, tokens)


async def poll_job(http: httpx.AsyncClient, key: str, *, wait: bool = False) -> Outcome:
    headers = {"apiKey": key}
    params = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS}
    t0 = time.perf_counter()
    r = await http.post("/v1/submit", json={"prompt": PROMPT, "params": params}, headers=headers)
    r.raise_for_status()
    job_id = r.json()["data"]["id"]
    query = "?wait=30" if wait else ""
    while True:
        r = await http.get(f"/v1/response/{job_id}{query}", headers=headers)
        r.raise_for_status()
        data = r.json()["data"]
        if data["completion"] is not None:
            total = time.perf_counter() - t0
            return Outcome(total, total, data["usage"]["completion_tokens"])
        if not wait:
            await asyncio.sleep(POLL_SLEEP_S)


async def long_poll_job(http: httpx.AsyncClient, key: str) -> Outcome:
    return await poll_job(http, key, wait=True)


async def phase(
    http: httpx.AsyncClient, key: str, mode: str, clients: int, jobs: int
) -> tuple[list[Outcome], float]:
    job = {"sse": sse_job, "poll": poll_job, "long": long_poll_job}[mode]
    queue = list(range(jobs))
    outcomes: list[Outcome] = []

    async def client() -> None:
        while queue:
            queue.pop()
            outcomes.append(await job(http, key))

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return outcomes, time.perf_counter() - t0


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from harness.processes import create_key_cli, start_server

    model = ensure_model()
    tmp = Path(tempfile.mkdtemp(prefix="bench-streaming-"))
    store = f"sqlite:///{tmp}/engine.db"
    key = create_key_cli(store, "bench")
    before = machine()
    server = start_server(
        ["--model", str(model), "--store", store, "--rate-limit-per-minute", "0", "--max-batch-size", "16"],
        tmp / "server.log",
    )
    results: dict[tuple[int, str], list[Outcome]] = {}
    walls: dict[tuple[int, str], float] = {}
    try:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=300.0) as http:
            await phase(http, key, "sse", 4, 8)  # warm-up
            await phase(http, key, "poll", 4, 8)
            await phase(http, key, "long", 4, 8)
            for r in range(args.rounds):
                for clients, jobs in ((1, args.jobs_1), (16, args.jobs_16)):
                    for mode in MODES[r % 3 :] + MODES[: r % 3]:  # each mode first once
                        outs, wall = await phase(http, key, mode, clients, jobs)
                        results.setdefault((clients, mode), []).extend(outs)
                        walls[(clients, mode)] = walls.get((clients, mode), 0.0) + wall
                        print(
                            f"round {r} clients {clients:>2} {mode:<4} {len(outs)} jobs in {wall:.2f} s",
                            flush=True,
                        )
    finally:
        code = server.stop()
        if code != 0:
            print(server.log()[-3000:], file=sys.stderr)
    rows = []
    figures: dict[str, Any] = {}
    for (clients, mode), outs in sorted(results.items()):
        ttft = [o.ttft_s * 1000 for o in outs]
        total = [o.total_s * 1000 for o in outs]
        tokens = sum(o.tokens for o in outs)
        tps = tokens / walls[(clients, mode)]
        figures[f"{clients}:{mode}"] = {
            "jobs": len(outs),
            "ttft_p50_ms": percentile(ttft, 50),
            "ttft_p99_ms": percentile(ttft, 99),
            "job_p50_ms": percentile(total, 50),
            "tokens_per_s": tps,
        }
        f = figures[f"{clients}:{mode}"]
        rows.append(
            [clients, mode, len(outs), f["ttft_p50_ms"], f["ttft_p99_ms"], f["job_p50_ms"], f["tokens_per_s"]]
        )
    print(
        table(
            ["clients", "mode", "jobs", "TTFT p50 ms", "TTFT p99 ms", "job p50 ms", "tokens/s"],
            rows,
        )
    )
    after = machine()
    payload = {
        "machine_before": before,
        "machine_after": after,
        "command": " ".join(sys.argv),
        "new_tokens": NEW_TOKENS,
        "figures": figures,
    }
    path = save_json("bench_streaming", payload)
    print(
        f"saved {path}; load average before {before['load_average_1_5_15']}, after {after['load_average_1_5_15']}"
    )
    return payload


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs-1", type=int, default=12, help="jobs per round at 1 client")
    parser.add_argument("--jobs-16", type=int, default=64, help="jobs per round at 16 clients")
    asyncio.run(run(parser.parse_args()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
