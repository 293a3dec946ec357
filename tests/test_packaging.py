"""Packaging: the wheel serves on its own, with the runtime dependencies alone.

The slow test does what a new user does: a clean checkout (`git archive HEAD`, so only committed
files), `deploy/package.sh build` (the sdist, then the wheel from it, as the container image's
builder stage does), `deploy/package.sh install` into a fresh venv (as the image's runtime stage
does), then `engine serve` from that venv on a demo model and the seed's flow (submit, poll until
completed). PyPI is reached through pip's index and cache; nothing else leaves the machine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import tomllib

from engine._version import __version__
from harness.processes import start_server

ROOT = Path(__file__).resolve().parents[1]
# Never in the runtime: the reference, the test tools, the build tools.
NOT_RUNTIME = ("torch", "transformers", "grpcio-tools", "pytest", "playwright", "matplotlib", "mypy", "build")


def pyproject() -> dict[str, Any]:
    data: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return data


def requirement_name(req: str) -> str:
    match = re.match(r"[A-Za-z0-9._-]+", req)
    assert match, req
    return match.group(0).lower().replace("_", "-")


def test_runtime_dependencies_are_what_serving_needs() -> None:
    project = pyproject()["project"]
    runtime = {requirement_name(r): r for r in project["dependencies"]}
    for name in NOT_RUNTIME:
        assert name not in runtime, f"{name} is a runtime dependency; it belongs in the dev extra"
    # The code relies on these libraries' internals: an upper bound keeps a new major out.
    for name in ("starlette", "uvicorn", "ctranslate2"):
        assert "<" in runtime[name], f"{name} needs an upper bound: {runtime[name]}"


def test_grpc_code_is_generated_by_the_build_with_the_version_the_runtime_accepts() -> None:
    data = pyproject()
    build_requires = {requirement_name(r): r for r in data["build-system"]["requires"]}
    tools = build_requires["grpcio-tools"]
    pinned = tools.split("==")[1]
    runtime = {requirement_name(r): r for r in data["project"]["dependencies"]}
    # Generated code refuses a grpcio older than the grpcio-tools that generated it.
    assert runtime["grpcio"] == f"grpcio>={pinned}"
    dev = {requirement_name(r): r for r in data["project"]["optional-dependencies"]["dev"]}
    assert dev["grpcio-tools"] == tools  # `python scripts/gen_proto.py` by hand gives the same code
    assert "ensure_generated" not in (ROOT / "engine" / "api" / "pb.py").read_text()


def test_one_version() -> None:
    assert pyproject()["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "engine._version.__version__"}
    out = subprocess.run(
        [sys.executable, "-m", "engine", "--version"], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == f"engine {__version__}"


def _get(url: str, key: str | None = None) -> Any:
    req = urllib.request.Request(url, headers={"apiKey": key} if key else {})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def _post(url: str, body: dict[str, Any], key: str) -> Any:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"apiKey": key, "content-type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


@pytest.mark.slow
@pytest.mark.e2e
def test_wheel_from_a_clean_checkout_serves_with_runtime_dependencies_only(tmp_path: Path) -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: no clean checkout to build from")
    src = tmp_path / "src"
    src.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "HEAD"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive.stdout, check=True)
    assert not (src / "engine" / "pb" / "engine" / "v1" / "engine_pb2.py").exists()
    # The environment a user has: no PYTHONPATH into this tree, no engine settings.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("ENGINE_")}
    env["PYTHON"] = sys.executable  # has `build` (dev extra); the venv is made from its base Python
    script = str(src / "deploy" / "package.sh")
    dist, venv = tmp_path / "dist", tmp_path / "venv"
    subprocess.run([script, "build", str(dist)], check=True, env=env, cwd=tmp_path, capture_output=True)
    wheels = list(dist.glob("*.whl"))
    assert len(wheels) == 1 and list(dist.glob("*.tar.gz")), list(dist.iterdir())
    subprocess.run([script, "install", str(venv), str(dist)], check=True, env=env, cwd=tmp_path)

    freeze = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "list", "--format=json"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    installed = {p["name"].lower().replace("_", "-"): p["version"] for p in json.loads(freeze.stdout)}
    assert installed["flan-t5-engine"] == __version__
    for name in ("torch", "transformers", "grpcio-tools"):
        assert name not in installed, f"{name} is installed with the wheel's runtime dependencies"
    engine_cmd = [str(venv / "bin" / "engine")]
    version = subprocess.run([*engine_cmd, "--version"], capture_output=True, text=True, check=True, env=env)
    assert version.stdout.strip() == f"engine {__version__}"

    # Imports come from the venv, not this tree: run where the tree is not on the path.
    work = tmp_path / "run"
    work.mkdir()
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import engine.api.pb, engine; print(engine.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        cwd=work,
    )
    assert where.stdout.strip().startswith(str(venv)), where.stdout
    model = work / "demo"
    subprocess.run([*engine_cmd, "demo-model", "--output", str(model)], check=True, env=env, cwd=work)
    store = f"sqlite:///{work}/engine.db"
    created = subprocess.run(
        [*engine_cmd, "keys", "create", "--name", "wheel", "--store", store],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        cwd=work,
    )
    key = created.stdout.strip().splitlines()[-1]
    server = start_server(
        ["--model", str(model), "--store", store], work / "server.log", command=engine_cmd, environ=env
    )
    try:
        info = _get(f"{server.url}/v1/info")
        assert info["version"] == __version__ and info["randomWeights"] is True
        submitted = _post(
            f"{server.url}/v1/submit", {"prompt": "Hello", "params": {"max_new_tokens": 8}}, key
        )
        deadline = time.monotonic() + 120
        while True:
            data = _get(submitted["data"]["responseUrl"], key)["data"]
            if data["completion"] is not None or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert data["status"] == "completed", data
        assert len(data["completion"]) == 1 and data["usage"]["completion_tokens"] >= 1
    finally:
        assert server.stop() == 0, server.log()
    assert "stopped" in server.log()
