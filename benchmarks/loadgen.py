"""A load generator for the engine's APIs: closed-loop concurrency or open-loop (Poisson) arrivals,
latency percentiles and throughput. Reusable as a library (``closed_loop``, ``open_loop``,
``summarize``, the request functions) and as a command:

    python benchmarks/loadgen.py --url http://127.0.0.1:8080 --key ek_... \\
        --concurrency 50 --requests 2000 --prompt "Hello" --params '{"max_new_tokens": 16}'
    python benchmarks/loadgen.py ... --rate 20 --requests 500          # open loop, 20 jobs/s
    python benchmarks/loadgen.py ... --mode grpc --grpc-target 127.0.0.1:50051

A "request" is one whole job as a client sees it: REST submit then poll until the completion
(``--poll long``: GET ?wait=30, answered the moment the job is done; ``--poll 0.02``: the seed's
loop with a 20 ms sleep), or one gRPC Generate call.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class Outcome:
    """One job as its client saw it. ``status`` is the HTTP status (or gRPC code name) of the
    answer that ended it; ``job_id`` is set when the submit was accepted."""

    start: float  # time.perf_counter()
    end: float
    status: str
    ok: bool
    job_id: str | None = None
    error: str | None = None
    polls: int = 0
    wall_start: float = 0.0  # time.time() at start and end: comparable with the server's stamps
    wall_end: float = 0.0

    @property
    def latency_s(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class Summary:
    requests: int
    ok: int
    statuses: dict[str, int]
    server_errors: int  # HTTP 5xx or gRPC INTERNAL/UNKNOWN/UNAVAILABLE
    duration_s: float
    throughput_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    mean_polls: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), math.ceil(q / 100.0 * len(ordered))))
    return ordered[rank - 1]


def _is_server_error(status: str) -> bool:
    return (status.isdigit() and int(status) >= 500) or status in (
        "INTERNAL",
        "UNKNOWN",
        "UNAVAILABLE",
        "EXCEPTION",
    )


def summarize(outcomes: Sequence[Outcome]) -> Summary:
    latencies = [o.latency_s * 1000 for o in outcomes if o.ok]
    duration = (max(o.end for o in outcomes) - min(o.start for o in outcomes)) if outcomes else 0.0
    statuses = Counter(o.status for o in outcomes)
    return Summary(
        requests=len(outcomes),
        ok=sum(o.ok for o in outcomes),
        statuses=dict(sorted(statuses.items())),
        server_errors=sum(n for s, n in statuses.items() if _is_server_error(s)),
        duration_s=duration,
        throughput_per_s=(sum(o.ok for o in outcomes) / duration) if duration > 0 else 0.0,
        p50_ms=percentile(latencies, 50) if latencies else float("nan"),
        p90_ms=percentile(latencies, 90) if latencies else float("nan"),
        p99_ms=percentile(latencies, 99) if latencies else float("nan"),
        mean_ms=statistics.fmean(latencies) if latencies else float("nan"),
        mean_polls=statistics.fmean(o.polls for o in outcomes) if outcomes else 0.0,
    )


# A coroutine function (not any awaitable): open_loop makes a task of each request.
RequestFn = Callable[[int], Coroutine[Any, Any, Outcome]]
T = TypeVar("T")


def run_client(main: Coroutine[Any, Any, T]) -> T:
    """Run the load generator on uvloop when it is installed (the server runs on it too): it
    shares the machine's cores with the server, and the default asyncio loop spends more CPU per
    request. The requests it sends are the same either way."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


class RawHttp:
    """A minimal HTTP/1.1 keep-alive client (one connection, one request at a time). The load
    generator shares the machine with the server; httpx spends about a millisecond of CPU per
    request, which under load shows up as latency that the server did not add."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def request(
        self, method: str, path: str, headers: dict[str, str], body: bytes = b""
    ) -> tuple[int, bytes]:
        reused = self._writer is not None and not self._writer.is_closing()
        try:
            return await self._request(method, path, headers, body)
        except (asyncio.IncompleteReadError, ConnectionResetError, BrokenPipeError) as exc:
            # A kept-alive connection the server closed while idle (uvicorn's keep-alive timeout)
            # fails before the request was read: send it again on a new connection, once, as
            # HTTP clients do. A fresh connection failing is a real error.
            partial = getattr(exc, "partial", b"")
            if not reused or partial:
                raise
            await self.close()
            return await self._request(method, path, headers, body)

    async def _request(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, bytes]:
        if self._writer is None or self._writer.is_closing():
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        assert self._reader is not None
        lines = [
            f"{method} {path} HTTP/1.1",
            f"Host: {self.host}:{self.port}",
            f"Content-Length: {len(body)}",
        ]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        self._writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        head = await self._reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        length = 0
        close = False
        for line in header_lines:
            name, _, value = line.partition(":")
            if name.lower() == "content-length":
                length = int(value)
            elif name.lower() == "connection" and value.strip().lower() == "close":
                close = True
        payload = await self._reader.readexactly(length) if length else b""
        if close:
            await self.close()
        return status, payload

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
            self._writer = None


Send = Callable[[str, str, "bytes | None"], Awaitable[tuple[int, bytes]]]


async def _submit_and_poll(
    send: Send, payload: bytes, interval: float | None, timeout_s: float, start: float, wall: float
) -> Outcome:
    """The seed's flow over any transport: ``send(method, path, body) -> (status, raw body)``."""
    status, raw = await send("POST", "/v1/submit", payload)
    if status != 200:
        return Outcome(start, time.perf_counter(), str(status), False, error=raw[:200].decode())
    job_id = json.loads(raw)["data"]["id"]
    path = f"/v1/response/{job_id}" + ("?wait=30" if interval is None else "")
    polls = 0
    while time.perf_counter() < start + timeout_s:
        status, raw = await send("GET", path, None)
        polls += 1
        if status != 200:
            return Outcome(start, time.perf_counter(), str(status), False, job_id, raw[:200].decode(), polls)
        got = json.loads(raw)["data"]
        if got["completion"] is not None:
            return Outcome(start, time.perf_counter(), "200", True, job_id, None, polls, wall, time.time())
        if got["status"] == "cancelled":
            return Outcome(start, time.perf_counter(), "cancelled", False, job_id, None, polls)
        if interval:
            await asyncio.sleep(interval)
    return Outcome(start, time.perf_counter(), "client-timeout", False, job_id, None, polls)


def raw_submit_and_poll(
    url: str,
    key: str,
    body: dict[str, Any],
    *,
    concurrency: int,
    poll: str = "long",
    timeout_s: float = 300.0,
) -> tuple[RequestFn, Callable[[], Awaitable[None]]]:
    """``rest_submit_and_poll`` over ``RawHttp`` connections (one per concurrent client).
    Returns the request function and a coroutine function that closes the connections."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    pool: asyncio.Queue[RawHttp] = asyncio.Queue()
    conns = [RawHttp(host, port) for _ in range(concurrency)]
    for c in conns:
        pool.put_nowait(c)
    headers = {"apiKey": key, "Content-Type": "application/json"}
    payload = json.dumps(body).encode()
    interval = None if poll == "long" else float(poll)

    async def run(_: int) -> Outcome:
        start = time.perf_counter()  # before waiting for a free connection: open-loop arrivals queue here
        wall = time.time()
        conn = await pool.get()

        async def send(method: str, path: str, data: bytes | None) -> tuple[int, bytes]:
            return await conn.request(method, path, headers, data or b"")

        try:
            return await _submit_and_poll(send, payload, interval, timeout_s, start, wall)
        except (OSError, asyncio.IncompleteReadError, ValueError, KeyError) as exc:
            await conn.close()
            return Outcome(start, time.perf_counter(), "EXCEPTION", False, error=repr(exc)[:200])
        finally:
            pool.put_nowait(conn)

    async def close() -> None:
        for c in conns:
            await c.close()

    return run, close


async def closed_loop(fn: RequestFn, *, concurrency: int, total: int) -> list[Outcome]:
    """``concurrency`` clients, each starting its next request when the last one ended."""
    counter = iter(range(total))
    outcomes: list[Outcome] = []

    async def client() -> None:
        for i in counter:
            outcomes.append(await fn(i))

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return outcomes


async def open_loop(fn: RequestFn, *, rate_per_s: float, total: int, seed: int = 0) -> list[Outcome]:
    """Requests arrive as a Poisson process of ``rate_per_s``, whatever the server's pace."""
    rng = random.Random(seed)
    tasks: list[asyncio.Task[Outcome]] = []
    next_at = time.perf_counter()
    for i in range(total):
        delay = next_at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(fn(i)))
        next_at += rng.expovariate(rate_per_s)
    return list(await asyncio.gather(*tasks))


def rest_submit_and_poll(
    client: httpx.AsyncClient,
    key: str,
    body: dict[str, Any],
    *,
    poll: str = "long",
    timeout_s: float = 300.0,
) -> RequestFn:
    """The seed's flow: POST /v1/submit, then GET the responseUrl until ``completion`` is set or
    the status is an error. ``poll`` is "long" (GET ?wait=30) or a sleep in seconds between polls."""
    headers = {"apiKey": key, "Content-Type": "application/json"}
    payload = json.dumps(body).encode()
    interval = None if poll == "long" else float(poll)

    async def run(_: int) -> Outcome:
        start = time.perf_counter()
        wall = time.time()

        async def send(method: str, path: str, data: bytes | None) -> tuple[int, bytes]:
            r = await client.request(method, path, content=data, headers=headers)
            return r.status_code, r.content

        try:
            return await _submit_and_poll(send, payload, interval, timeout_s, start, wall)
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            return Outcome(start, time.perf_counter(), "EXCEPTION", False, error=repr(exc)[:200])

    return run


def grpc_generate(stub: Any, key: str, prompts: list[str], params: dict[str, Any]) -> RequestFn:
    """One unary Generate call per request (no polling): the gRPC path's cost."""
    import grpc
    from google.protobuf import struct_pb2

    from engine.api.pb import engine_pb2

    struct = struct_pb2.Struct()
    struct.update(params)
    request = engine_pb2.SubmitRequest(prompts=prompts, params=struct)
    metadata = (("apikey", key),)

    async def run(_: int) -> Outcome:
        start = time.perf_counter()
        wall = time.time()
        try:
            job = await stub.Generate(request, metadata=metadata, timeout=300)
        except grpc.aio.AioRpcError as exc:
            return Outcome(start, time.perf_counter(), exc.code().name, False, error=exc.details())
        return Outcome(start, time.perf_counter(), "OK", True, job.id, wall_start=wall, wall_end=time.time())

    return run


def print_table(rows: Sequence[tuple[str, Summary]]) -> None:
    head = f"{'run':<28} {'reqs':>5} {'ok':>5} {'5xx':>4} {'req/s':>7} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'polls':>6}"
    print(head)
    print("-" * len(head))
    for name, s in rows:
        print(
            f"{name:<28} {s.requests:>5} {s.ok:>5} {s.server_errors:>4} {s.throughput_per_s:>7.1f} "
            f"{s.p50_ms:>8.1f} {s.p90_ms:>8.1f} {s.p99_ms:>8.1f} {s.mean_polls:>6.1f}"
        )


async def _main(args: argparse.Namespace) -> int:
    params = json.loads(args.params) if args.params else {}
    prompts = args.prompt or ["A step by step recipe to make bolognese pasta:"]
    limits = httpx.Limits(
        max_connections=args.concurrency + 10, max_keepalive_connections=args.concurrency + 10
    )
    if args.mode == "grpc":
        import grpc

        from engine.api.pb import engine_pb2_grpc

        channel = grpc.aio.insecure_channel(args.grpc_target)
        fn = grpc_generate(engine_pb2_grpc.EngineStub(channel), args.key, prompts, params)
    elif args.client == "raw":
        body = {"prompt": prompts if len(prompts) > 1 else prompts[0], "params": params}
        fn, _close = raw_submit_and_poll(
            args.url, args.key, body, concurrency=args.concurrency, poll=args.poll
        )
    else:
        client = httpx.AsyncClient(base_url=args.url, limits=limits, timeout=httpx.Timeout(120.0))
        body = {"prompt": prompts if len(prompts) > 1 else prompts[0], "params": params}
        fn = rest_submit_and_poll(client, args.key, body, poll=args.poll)
    if args.rate:
        outcomes = await open_loop(fn, rate_per_s=args.rate, total=args.requests, seed=args.seed)
        name = f"{args.mode} open loop {args.rate:g}/s"
    else:
        outcomes = await closed_loop(fn, concurrency=args.concurrency, total=args.requests)
        name = f"{args.mode} closed loop x{args.concurrency}"
    summary = summarize(outcomes)
    print_table([(name, summary)])
    print("statuses:", summary.statuses)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps({"run": name, "summary": asdict(summary)}, indent=2))
        print(f"saved {args.output}")
    return 0 if summary.server_errors == 0 else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8080")
    p.add_argument("--grpc-target", default="127.0.0.1:50051")
    p.add_argument("--mode", choices=["rest", "grpc"], default="rest")
    p.add_argument("--key", required=True, help="an API key (engine keys create --name bench)")
    p.add_argument("--prompt", action="append", help="a prompt (repeat for a multi-prompt job)")
    p.add_argument("--params", default=None, help="decoding params as JSON")
    p.add_argument("--concurrency", type=int, default=50, help="closed loop: clients in parallel")
    p.add_argument("--rate", type=float, default=None, help="open loop: job arrivals per second")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument(
        "--client",
        choices=["raw", "httpx"],
        default="raw",
        help="REST client (raw: a light keep-alive client)",
    )
    p.add_argument("--poll", default="long", help="'long' (GET ?wait=30) or seconds between polls")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="save the summary as JSON here")
    return run_client(_main(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
