"""Real processes for end-to-end tests and benchmarks: `engine serve` on free loopback ports, `engine
keys create` as a user runs it, and a throwaway redis-server. Loopback only; every process started
here is stopped by its owner (``ServerProcess.stop``, the ``redis_server`` context)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The line `engine serve` logs once it serves, in text or JSON format.
READY = re.compile(r'[ "]ready: ')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def create_key_cli(store_url: str, name: str) -> str:
    """``engine keys create`` as a user runs it: the key is the last line of its output."""
    proc = subprocess.run(
        [sys.executable, "-m", "engine", "keys", "create", "--name", name, "--store", store_url],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return proc.stdout.strip().splitlines()[-1]


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    log_path: Path
    http_port: int
    grpc_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout_s: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)


def start_server(
    args: Sequence[str],
    log_path: Path,
    *,
    timeout_s: float = 120.0,
    command: Sequence[str] = (sys.executable, "-m", "engine"),
    environ: Mapping[str, str] | None = None,
) -> ServerProcess:
    """``engine serve ARGS`` on free ports; returns once it logged its ``ready`` line. ``command`` is
    how ``engine`` is run (an installed one: ``[".../bin/engine"]``), ``environ`` its environment."""
    http_port, grpc_port = free_port(), free_port()
    cmd = [
        *command,
        "serve",
        "--http-port",
        str(http_port),
        "--grpc-port",
        str(grpc_port),
        *args,
    ]
    env = {**(os.environ if environ is None else environ), "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, cwd=log_path.parent, env=env)
    server = ServerProcess(proc, log_path, http_port, grpc_port)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if READY.search(server.log()):
            return server
        if proc.poll() is not None:
            raise RuntimeError(f"engine serve exited with {proc.returncode}:\n{server.log()}")
        time.sleep(0.05)
    server.stop()
    raise RuntimeError(f"engine serve did not log ready within {timeout_s} s:\n{server.log()}")


@contextlib.contextmanager
def redis_server(folder: Path) -> Iterator[str]:
    """A throwaway redis-server on a free port (no persistence); yields its URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(folder),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
