"""benchmarks/loadgen.py: the load generator the API and benchmark issues measure with."""

from __future__ import annotations

import asyncio
import time

import pytest

from benchmarks.loadgen import Outcome, closed_loop, open_loop, percentile, summarize


def test_percentile_is_nearest_rank() -> None:
    values = list(range(1, 101))
    assert percentile(values, 50) == 50
    assert percentile(values, 90) == 90
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile([7.0], 50) == 7.0


def test_summarize_counts_server_errors_and_only_times_successes() -> None:
    outcomes = [
        Outcome(0.0, 0.010, "200", True),
        Outcome(0.0, 0.020, "200", True),
        Outcome(0.0, 5.000, "500", False),
        Outcome(0.0, 0.001, "429", False),
        Outcome(0.0, 0.001, "UNAVAILABLE", False),
    ]
    s = summarize(outcomes)
    assert (s.requests, s.ok, s.server_errors) == (5, 2, 2)
    assert s.statuses == {"200": 2, "429": 1, "500": 1, "UNAVAILABLE": 1}
    assert s.p50_ms == pytest.approx(10.0) and s.p99_ms == pytest.approx(20.0)


def test_closed_loop_keeps_the_concurrency() -> None:
    in_flight = 0
    peak = 0

    async def fn(i: int) -> Outcome:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        start = time.perf_counter()
        await asyncio.sleep(0.002)
        in_flight -= 1
        return Outcome(start, time.perf_counter(), "200", True)

    outcomes = asyncio.run(closed_loop(fn, concurrency=5, total=40))
    assert len(outcomes) == 40 and peak == 5


def test_open_loop_sends_at_the_rate_whatever_the_answers() -> None:
    async def slow(i: int) -> Outcome:
        start = time.perf_counter()
        await asyncio.sleep(0.2)  # slower than the arrivals: an open loop does not wait for it
        return Outcome(start, time.perf_counter(), "200", True)

    started = time.perf_counter()
    outcomes = asyncio.run(open_loop(slow, rate_per_s=200.0, total=40, seed=1))
    elapsed = time.perf_counter() - started
    assert len(outcomes) == 40
    starts = sorted(o.start for o in outcomes)
    assert starts[-1] - starts[0] < 1.5  # ~0.2 s of arrivals at 200/s, far less than 40 x 0.2 s
    assert elapsed < 3.0


def test_raw_client_resends_once_on_a_keep_alive_connection_the_server_closed() -> None:
    from benchmarks.loadgen import RawHttp

    async def main() -> list[int]:
        connections = 0

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal connections
            connections += 1
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            writer.close()  # as a server whose keep-alive timeout expired, without saying so

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = RawHttp("127.0.0.1", port)
        statuses = []
        for _ in range(3):
            status, body = await client.request("GET", "/", {})
            assert body == b"ok"
            statuses.append(status)
            await asyncio.sleep(0.01)
        await client.close()
        server.close()
        await server.wait_closed()
        assert connections == 3
        return statuses

    assert asyncio.run(main()) == [200, 200, 200]
