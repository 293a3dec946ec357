"""What a new user waits for: a clean clone, then `make serve`, until the first completion.

    python benchmarks/bench_fresh_serve.py [--repo PATH] [--branch NAME] [--workdir DIR]

Clones the repository (default: this one, its current branch) into a fresh folder, runs
`make serve` there with auth off and free ports (no model: the default path, which falls back to
the demo model where the Hub cannot be reached), waits for the line with ``ready``, submits one job
with the seed's API and polls it until it completes. Prints and saves (benchmarks/out/
fresh_serve.json) the time of each phase and the size of the `.venv` that `make serve` made. The
clone and its venv are removed afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import OUT_DIR, machine  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def du_mb(path: Path) -> float:
    total = 0
    for p in path.rglob("*"):
        if p.is_file() and not p.is_symlink():
            total += p.stat().st_size
    return total / 1e6


def http_json(method: str, url: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        result: dict[str, Any] = json.loads(resp.read())
        return result


def current_branch() -> str:
    out = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--abbrev-ref", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repo", default=str(ROOT), help="repository to clone (default: this one)")
    parser.add_argument("--branch", default=None, help="branch to clone (default: the current one)")
    parser.add_argument("--workdir", type=Path, default=None, help="where to clone (default: a temp folder)")
    parser.add_argument("--label", default="", help="a name for this run in the saved figures")
    parser.add_argument("--keep", action="store_true", help="keep the clone and its venv")
    parser.add_argument("--timeout-s", type=float, default=1800.0)
    args = parser.parse_args()
    branch = args.branch or current_branch()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fresh-serve-"))
    clone = workdir / "clone"
    http_port, grpc_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ENGINE_", "VIRTUAL_ENV", "PYTHON"))}
    env.update(ENGINE_AUTH_DISABLED="1", PATH=os.environ["PATH"])
    figures: dict[str, Any] = {"label": args.label, "repo": args.repo, "branch": branch, "machine": machine()}
    t0 = time.monotonic()
    subprocess.run(["git", "clone", "-q", "-b", branch, args.repo, str(clone)], check=True)
    figures["clone_s"] = round(time.monotonic() - t0, 2)
    log_path = workdir / "serve.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [
                "make",
                "--no-print-directory",
                "serve",
                f"SERVE_ARGS=--http-port {http_port} --grpc-port {grpc_port}",
            ],
            cwd=clone,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = t0 + args.timeout_s
        while "ready" not in log_path.read_text():
            if proc.poll() is not None:
                raise SystemExit(f"make serve exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise SystemExit("make serve never became ready")
            time.sleep(0.5)
        figures["ready_s"] = round(time.monotonic() - t0, 2)
        base = f"http://127.0.0.1:{http_port}"
        reply = http_json("POST", f"{base}/v1/submit", {"prompt": "Translate to German: hello", "params": {}})
        job_id = reply["data"]["id"]
        while True:
            data = http_json("GET", f"{base}/v1/response/{job_id}")["data"]
            if data["status"] == "completed":
                break
            if data["status"] in ("failed", "cancelled"):
                raise SystemExit(f"job ended {data['status']}: {data}")
            time.sleep(0.1)
        figures["first_completion_s"] = round(time.monotonic() - t0, 2)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    figures["venv_mb"] = round(du_mb(clone / ".venv"), 1)
    pip = subprocess.run(
        [str(clone / ".venv" / "bin" / "python"), "-m", "pip", "list", "--format=freeze"],
        capture_output=True,
        text=True,
        check=False,
    )
    figures["packages"] = len(pip.stdout.split())
    figures["has_torch"] = any(line.lower().startswith("torch==") for line in pip.stdout.split())
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    for key in ("clone_s", "ready_s", "first_completion_s", "venv_mb", "packages", "has_torch"):
        print(f"{key:20s} {figures[key]}")
    OUT_DIR.mkdir(exist_ok=True)
    out = OUT_DIR / f"fresh_serve{'_' + args.label if args.label else ''}.json"
    out.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"saved {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
