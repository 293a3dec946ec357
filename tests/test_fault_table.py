"""The fault table, one test per row, with real processes: `engine serve` on the tiny test model,
real redis-server and SQLite files. Each row says what the operator sees during the fault (health,
readiness, 503 + Retry-After, gRPC health) and checks that every job accepted before it ends
completed. docs/faults.md is the prose form of this table."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc

from harness.processes import ServerProcess, create_key_cli, free_port, start_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SECRET = "Pa55-w0rd-not-for-logs"
PARAMS = {"max_new_tokens": 8}
ROOT = Path(__file__).resolve().parent.parent


def needs(binary: str) -> None:
    import shutil

    if shutil.which(binary) is None:
        pytest.skip(f"{binary} is not installed (scripts/system-deps.sh installs it)")


class RedisProc:
    """A redis-server we can kill, restart, pause and resume on one port, with an append-only file
    fsynced on every write (a restart keeps every accepted job)."""

    def __init__(self, folder: Path, password: str | None = None) -> None:
        needs("redis-server")
        self.folder = folder
        self.port = free_port()
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder)]
        args += ["--save", "", "--appendonly", "yes", "--appendfsync", "always"]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                assert time.monotonic() < deadline and self.proc.poll() is None, "redis-server did not start"
                time.sleep(0.02)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def redis_proc(tmp_path: Path) -> Iterator[RedisProc]:
    r = RedisProc(tmp_path, password=SECRET)
    yield r
    r.stop()


def serve(model: Path, store: str, log: Path, *extra: str) -> ServerProcess:
    return start_server(["--model", str(model), "--store", store, *extra], log)


def submit(server: ServerProcess, key: str, prompt: str, timeout_s: float = 5.0) -> requests.Response:
    return requests.post(
        f"{server.url}/v1/submit",
        headers={"apiKey": key},
        json={"prompt": prompt, "params": PARAMS},
        timeout=timeout_s,
    )


def until(predicate: Callable[[], bool], what: str, timeout_s: float = 20.0, log: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def grpc_status(server: ServerProcess) -> int:
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            return int(stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status)
        except grpc.RpcError:
            return -1


def ready(server: ServerProcess) -> bool:
    return requests.get(f"{server.url}/readyz", timeout=2).status_code == 200


class Load:
    """Submits a job every ``every_s`` from a thread, to one or more servers; records what was
    accepted (200) and every other answer's status."""

    def __init__(self, servers: list[ServerProcess], key: str, every_s: float = 0.05) -> None:
        self.servers = servers
        self.key = key
        self.every_s = every_s
        self.accepted: dict[str, ServerProcess] = {}
        self.refused: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        i = 0
        while not self._stop.wait(self.every_s):
            server = self.servers[i % len(self.servers)]
            i += 1
            try:
                r = submit(server, self.key, f"load {i}", timeout_s=3)
            except requests.RequestException:
                self.refused.append(0)
                continue
            if r.status_code == 200:
                self.accepted[r.json()["data"]["id"]] = server
            else:
                self.refused.append(r.status_code)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def wait_completed(server: ServerProcess, key: str, job_ids: list[str], timeout_s: float = 60.0) -> None:
    """Every job completed (read through ``server``; any replica of a fleet answers for all)."""
    deadline = time.monotonic() + timeout_s
    for job_id in job_ids:
        while True:
            r = requests.get(f"{server.url}/v1/response/{job_id}?wait=5", headers={"apiKey": key}, timeout=10)
            if r.status_code == 200 and r.json()["data"]["status"] == "completed":
                break
            assert r.status_code in (200, 503), (job_id, r.status_code, r.text)
            assert time.monotonic() < deadline, f"job {job_id} did not complete: {r.text}"
            time.sleep(0.1)


def assert_outage_seen(server: ServerProcess, key: str) -> None:
    """What an operator and a client see while the store is down."""
    until(lambda: not ready(server), "/readyz to say not ready")
    t0 = time.monotonic()
    assert requests.get(f"{server.url}/healthz", timeout=1).status_code == 200
    assert time.monotonic() - t0 < 1.0
    r = submit(server, key, "during the outage", timeout_s=5)
    assert r.status_code == 503, r.text
    assert r.headers.get("Retry-After", "").isdigit(), r.headers
    message = r.json()["error"]["message"]
    assert "unavailable" in message and "redis" not in message.lower() and SECRET not in r.text
    until(lambda: grpc_status(server) == health_pb2.HealthCheckResponse.NOT_SERVING, "gRPC NOT_SERVING")


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        assert SECRET not in text


# -- rows ---------------------------------------------------------------------------------------
def test_row_second_server_on_one_sqlite_file(tmp_path: Path, flan_model_dir: Path) -> None:
    store = f"sqlite:///{tmp_path}/engine.db"
    key = create_key_cli(store, "alice")
    first = serve(flan_model_dir, store, tmp_path / "first.log")
    try:
        r = submit(first, key, "the first server's job")
        assert r.status_code == 200
        job_id = r.json()["data"]["id"]
        wait_completed(first, key, [job_id])
        before = (
            sqlite3.connect(tmp_path / "engine.db")
            .execute("SELECT id, status, attempts FROM jobs")
            .fetchall()
        )
        proc = subprocess.run(
            [sys.executable, "-m", "engine", "serve", "--model", str(flan_model_dir), "--store", store,
             "--http-port", str(free_port()), "--grpc-port", str(free_port())],
            capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
        )  # fmt: skip
        assert proc.returncode == 2, proc.stderr
        assert f"{tmp_path}/engine.db is in use by another server (pid {first.proc.pid}" in proc.stderr
        assert "redis://" in proc.stderr and "ready" not in proc.stderr
        after = (
            sqlite3.connect(tmp_path / "engine.db")
            .execute("SELECT id, status, attempts FROM jobs")
            .fetchall()
        )
        assert after == before  # nothing requeued, nothing run twice
        assert ready(first)
    finally:
        assert first.stop() == 0


def test_row_secrets_a_down_redis_with_a_password_never_shows_it(
    tmp_path: Path, flan_model_dir: Path
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    url = f"redis://:{SECRET}@127.0.0.1:{closed}/0"
    proc = subprocess.run(
        [sys.executable, "-m", "engine", "serve", "--model", str(flan_model_dir), "--store", url],
        capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert_no_secret(proc.stdout, proc.stderr)
    assert f"redis://:***@127.0.0.1:{closed}/0" in proc.stderr and "Traceback" not in proc.stderr


def test_row_url_options_work_for_every_command(tmp_path: Path, flan_model_dir: Path) -> None:
    redis = RedisProc(tmp_path, password=SECRET)
    try:
        url = f"{redis.url}?lease_s=3&prefix=row:&timeout_s=0.5&connect_timeout_s=0.5"
        key = create_key_cli(url, "alice")
        server = serve(flan_model_dir, url, tmp_path / "server.log")
        try:
            r = submit(server, key, "options")
            assert r.status_code == 200, r.text
            wait_completed(server, key, [r.json()["data"]["id"]])
        finally:
            assert server.stop() == 0
        import redis as redis_client

        client = redis_client.Redis.from_url(redis.url, decode_responses=True)
        names = client.keys("*")
        client.close()
        assert names and all(str(n).startswith("row:") for n in names), names
        assert_no_secret(server.log())
    finally:
        redis.stop()


@contextlib.contextmanager
def serving_under_load(model: Path, url: str, tmp_path: Path) -> Iterator[tuple[ServerProcess, str, Load]]:
    """A server on ``url`` with a key, and a load that has had 10 jobs accepted: the fault comes next."""
    key = create_key_cli(url, "alice")
    server = serve(model, url, tmp_path / "server.log")
    try:
        load = Load([server], key)
        until(lambda: len(load.accepted) >= 10, "jobs accepted before the fault")
        yield server, key, load
    finally:
        assert server.stop() == 0


def test_row_redis_killed_and_restarted_under_load(
    redis_proc: RedisProc, tmp_path: Path, flan_model_dir: Path
) -> None:
    with serving_under_load(flan_model_dir, f"{redis_proc.url}?lease_s=2", tmp_path) as (server, key, load):
        redis_proc.kill()
        assert_outage_seen(server, key)
        redis_proc.start()
        until(lambda: ready(server), "ready again after the restart")
        until(lambda: grpc_status(server) == health_pb2.HealthCheckResponse.SERVING, "gRPC SERVING")
        accepted_before = len(load.accepted)
        until(lambda: len(load.accepted) > accepted_before + 5, "jobs accepted after the restart")
        load.stop()
        wait_completed(server, key, list(load.accepted))
        metrics = requests.get(f"{server.url}/metrics", timeout=5).text
        assert_no_secret(server.log(), metrics)
        assert set(load.refused) <= {503}, load.refused


def test_row_redis_paused(redis_proc: RedisProc, tmp_path: Path, flan_model_dir: Path) -> None:
    url = f"{redis_proc.url}?lease_s=2&timeout_s=0.5"
    with serving_under_load(flan_model_dir, url, tmp_path) as (server, key, load):
        redis_proc.signal(signal.SIGSTOP)
        try:
            assert_outage_seen(server, key)
        finally:
            redis_proc.signal(signal.SIGCONT)
        until(lambda: ready(server), "ready again after the pause")
        load.stop()
        wait_completed(server, key, list(load.accepted))
        assert_no_secret(server.log())


def test_row_sqlite_locked_by_another_process(tmp_path: Path, flan_model_dir: Path) -> None:
    db = tmp_path / "engine.db"
    with serving_under_load(flan_model_dir, f"sqlite:///{db}", tmp_path) as (server, key, load):
        # Another process (a backup, a careless sqlite3 shell) holds the write lock.
        holder = subprocess.Popen(
            [sys.executable, "-c",
             "import sqlite3, sys; c = sqlite3.connect(sys.argv[1], isolation_level=None); "
             "c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); sys.stdin.read()", str(db)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
            until(lambda: not ready(server), "/readyz to say not ready")
            t0 = time.monotonic()
            assert requests.get(f"{server.url}/healthz", timeout=1).status_code == 200
            assert time.monotonic() - t0 < 1.0
            r = submit(server, key, "while locked")
            assert r.status_code == 503 and r.headers.get("Retry-After"), r.text
            assert "unavailable" in r.json()["error"]["message"] and str(db) not in r.text
        finally:
            assert holder.stdin is not None and holder.stdout is not None
            holder.stdin.close()
            holder.wait(10)
            holder.stdout.close()
        until(lambda: ready(server), "ready again once the lock is released")
        accepted_before = len(load.accepted)
        until(lambda: len(load.accepted) > accepted_before + 5, "jobs accepted after the lock")
        load.stop()
        wait_completed(server, key, list(load.accepted))


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(disk: Path) -> Path:
    """Fill the disk to the last byte; returns the filler file (delete it to free the disk)."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 4096, 1):
            try:
                while os.write(fd, b"\0" * size):
                    pass
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


def test_row_disk_full_during_submits_and_during_a_completion(
    small_disk: Path, tmp_path: Path, flan_model_dir: Path
) -> None:
    store = f"sqlite:///{small_disk}/engine.db"
    key = create_key_cli(store, "alice")
    server = serve(flan_model_dir, store, tmp_path / "server.log", "--max-new-tokens-limit", "1000")
    try:
        accepted = []
        for i in range(5):
            r = submit(server, key, f"before {i}")
            assert r.status_code == 200
            accepted.append(r.json()["data"]["id"])
        wait_completed(server, key, accepted)
        filler = fill(small_disk)
        refused = [submit(server, key, f"full {i}") for i in range(20)]
        codes = {r.status_code for r in refused}
        assert codes <= {200, 503}, codes
        assert 503 in codes, "a full disk never refused a submit"
        for r in refused:
            if r.status_code == 503:
                assert r.headers.get("Retry-After") and "unavailable" in r.json()["error"]["message"]
            else:
                accepted.append(r.json()["data"]["id"])  # answered 200: it is on disk
        filler.unlink()
        until(lambda: ready(server), "ready once the disk has room")
        # The disk fills while a long job runs: its results (64 x 400 tokens, more than the room
        # left in the WAL file) cannot be written. Once the disk has room, it goes back to the
        # queue (found from the store, not from memory) and runs again. A job that finished
        # before the disk was full (a fast machine) proves nothing: then try again.
        for _ in range(3):
            long = requests.post(
                f"{server.url}/v1/submit",
                headers={"apiKey": key},
                json={
                    "prompt": [f"long {i}" for i in range(64)],
                    "params": {"max_new_tokens": 400, "min_new_tokens": 400},
                },
                timeout=5,
            )
            assert long.status_code == 200, long.text
            accepted.append(long.json()["data"]["id"])
            until(lambda: job_status(server, key, accepted[-1]) == "running", "the long job to run")
            filler = fill(small_disk)
            until(
                lambda: (
                    "could not be written to the store" in server.log()
                    or job_status(server, key, accepted[-1]) == "completed"
                ),
                "the long job's end",
                timeout_s=90,
            )
            filler.unlink()
            if "could not be written to the store" in server.log():
                break
        assert "could not be written to the store" in server.log()
        until(lambda: ready(server), "ready once the disk has room")
        wait_completed(server, key, accepted)
    finally:
        assert server.stop() == 0


def job_status(server: ServerProcess, key: str, job_id: str) -> str | None:
    """The job's status, or None while the store does not answer (503)."""
    r = requests.get(f"{server.url}/v1/response/{job_id}", headers={"apiKey": key}, timeout=5)
    return str(r.json()["data"]["status"]) if r.status_code == 200 else None


def test_row_multi_replica_shared_rate_limit_and_a_replica_killed_under_load(
    redis_proc: RedisProc, tmp_path: Path, flan_model_dir: Path
) -> None:
    url = f"{redis_proc.url}?lease_s=2"
    key = create_key_cli(url, "alice")
    limited = create_key_cli(url, "limited")
    a = serve(flan_model_dir, url, tmp_path / "a.log", "--rate-limit-per-minute", "60")
    b = serve(flan_model_dir, url, tmp_path / "b.log", "--rate-limit-per-minute", "60")
    try:
        # One key's limit holds across both replicas: 60 a minute is one bucket of 60 (refilled
        # at 1 a second), taken through either replica. Two buckets would admit all 100.
        start = time.monotonic()
        codes = [
            submit(a if i % 2 else b, limited, f"burst {i}", timeout_s=10).status_code for i in range(100)
        ]
        elapsed = time.monotonic() - start
        assert set(codes) == {200, 429}, set(codes)
        assert 60 <= codes.count(200) <= 60 + elapsed + 1, (codes.count(200), elapsed)
        # Each replica reports the shared queue's depth (a dashboard takes max over replicas).
        depths = [
            re.search(r"^engine_queue_depth (\S+)$", requests.get(f"{s.url}/metrics", timeout=5).text, re.M)
            for s in (a, b)
        ]
        assert all(d is not None for d in depths)
        load = Load([a, b], key)
        until(lambda: sum(s is a for s in load.accepted.values()) >= 10, "jobs accepted by replica a")
        a.proc.kill()  # kill -9 under load
        a.proc.wait(10)
        load.servers = [b]
        accepted_before = len(load.accepted)
        until(lambda: len(load.accepted) > accepted_before + 10, "jobs accepted by b after the kill")
        load.stop()
        wait_completed(b, key, list(load.accepted), timeout_s=120)
    finally:
        a.stop()
        assert b.stop() == 0


def test_row_clock_step_of_60_s_moves_no_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    """A wall-clock step (NTP, an operator) while jobs wait: no job times out early (step
    forward) and none waits for a step back (the timers run on the monotonic clock)."""
    import asyncio

    from engine.runtime.params import DecodingParams
    from engine.serving.clock import RealClock
    from harness.fakes import FakeEngine, start_service

    async def body() -> None:
        gate = threading.Event()
        svc = await start_service(
            FakeEngine(gate=gate), clock=RealClock(), job_timeout_s=30.0, max_queue_delay_ms=50.0
        )
        running = await svc.submit("a", ["holds the engine"], DecodingParams(max_new_tokens=4))
        queued = [
            await svc.submit("a", [f"q{i}"], DecodingParams(num_beams=2, max_new_tokens=4)) for i in range(3)
        ]
        real = time.time
        for step in (60.0, -60.0):
            monkeypatch.setattr(time, "time", lambda step=step: real() + step)
            await asyncio.sleep(1.5)  # the timeout sweep runs (every second) under the stepped clock
            for v in (running, *queued):
                got = await svc.get("a", v.job.id)
                assert not got.job.status.terminal, got.job
        gate.set()
        for v in (running, *queued):
            done = await asyncio.wait_for(svc.wait("a", v.job.id, 10), 15)
            assert done.job.status.value == "completed", done.job
        await svc.stop()

    asyncio.run(body())
