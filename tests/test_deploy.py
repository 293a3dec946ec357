"""deploy/ checked against the code: the Dockerfile, the compose file, the Kubernetes manifests and
Grafana's provisioning. Docker and Kubernetes do not run here (no engine, no cluster); these tests
load every artifact and check what the code decides: probe paths and ports exist in the app, every
ENGINE_* name is a Config field with a valid value, grace periods exceed the server's shutdown,
the image installs through deploy/package.sh (the steps tests/test_packaging.py runs), and the
dashboard's provisioning matches the dashboard. The dashboard's queries are checked against the
server's metrics in tests/test_api_dashboard.py and, with a real Prometheus, in test_e2e_api.py.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml

from engine.api.rest import create_app
from engine.api.server import DRAIN_TIMEOUT_S, HTTP_GRACE_S
from engine.cli import build_parser
from engine.config import Config
from engine.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
ENGINE_VARS = {f"ENGINE_{f.name.upper()}" for f in fields(Config)}
# The longest `engine serve` takes from SIGTERM to exit (engine/api/server.py): the job service's
# drain, gRPC's 2 s grace, then uvicorn's graceful shutdown and the 5 s it is waited beyond that.
SHUTDOWN_S = DRAIN_TIMEOUT_S + 2.0 + HTTP_GRACE_S + 5.0


def app_paths() -> set[str]:
    app = create_app(None, Metrics())  # type: ignore[arg-type]  # routes only: no request is made
    return {getattr(r, "path", "") for r in app.routes}


def check_engine_env(env: dict[str, str], where: str) -> Config:
    """Every ENGINE_* name is a Config field and every value parses; returns the Config they give."""
    unknown = {k for k in env if k.startswith("ENGINE_")} - ENGINE_VARS
    assert not unknown, f"{where}: not Config fields: {unknown}"
    return Config.build(environ={k: str(v) for k, v in env.items() if k.startswith("ENGINE_")})


def check_engine_commands(script: str, where: str) -> None:
    """Each `engine ...` command in a shell line parses with the real CLI."""
    for part in re.split(r"\|\||&&|;", script):
        words = shlex.split(part)
        if words and words[0] == "engine":
            try:
                build_parser().parse_args(words[1:])
            except SystemExit:
                pytest.fail(f"{where}: `{part.strip()}` is not a valid engine command")


# ---- Dockerfile -------------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for instruction in dockerfile():
        if instruction[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(instruction)
    return result


def docker_env(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in stage:
        if word == "ENV":
            for item in shlex.split(rest):
                name, _, value = item.partition("=")
                env[name] = value
    return env


def test_dockerfile_is_multi_stage_and_runs_as_a_user() -> None:
    builder, runtime = stages()
    assert " AS " in builder[0][1].upper() and " AS " in runtime[0][1].upper()
    users = [rest for word, rest in runtime if word == "USER"]
    assert users and users[-1] not in ("root", "0"), users
    runtime_text = " ".join(rest for _, rest in runtime)
    assert "gcc" not in runtime_text, "the runtime stage carries the compiler"
    volumes = " ".join(rest for word, rest in runtime if word == "VOLUME")
    assert "/models" in volumes and "/data" in volumes


def test_dockerfile_installs_through_the_tested_script() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    builder, runtime = stages()
    assert any(w == "RUN" and "deploy/package.sh build" in r for w, r in builder)
    assert any(w == "RUN" and "package.sh install" in r for w, r in runtime)
    assert "pip install" not in text, "install steps belong in deploy/package.sh, which CI runs"
    assert (DEPLOY / "package.sh").stat().st_mode & 0o111, "deploy/package.sh must be executable"


def test_dockerfile_env_ports_and_healthcheck_match_the_app() -> None:
    _, runtime = stages()
    env = docker_env(runtime)
    cfg = check_engine_env(env, "Dockerfile")
    assert cfg.http_host == "0.0.0.0" and cfg.grpc_host == "0.0.0.0"
    assert cfg.model_dir and cfg.model_dir.startswith("/models/")
    assert cfg.store_url.startswith("sqlite:////data/")
    exposed = {int(p) for w, r in runtime if w == "EXPOSE" for p in r.split()}
    assert exposed == {cfg.http_port, cfg.grpc_port}
    (health,) = [r for w, r in runtime if w == "HEALTHCHECK"]
    path = re.search(r"(/[a-z]+)'", health)
    assert path and path.group(1) == "/healthz" and path.group(1) in app_paths()
    assert "ENGINE_HTTP_PORT" in health  # follows the port if an operator moves it
    entry = [r for w, r in runtime if w == "ENTRYPOINT"][-1]
    cmd = [r for w, r in runtime if w == "CMD"][-1]
    words = [*yaml.safe_load(entry), *yaml.safe_load(cmd)]
    assert words[0] == "engine"
    assert build_parser().parse_args(words[1:]).command == "serve"


def test_dockerignore_keeps_local_state_out_of_the_image() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".venv", ".venv-ref", "models", "data", "engine/pb/**/*_pb2*"):
        assert entry in ignored, entry


# ---- compose ----------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return data


def engine_services() -> dict[str, dict[str, Any]]:
    return {
        name: s
        for name, s in compose()["services"].items()
        if s.get("build", {}).get("dockerfile") == "deploy/Dockerfile" and "ports" in s
    }


def test_compose_has_redis_with_aof_and_two_replicas_on_it() -> None:
    services = compose()["services"]
    redis = services["redis"]
    assert (
        "--appendonly" in redis["command"]
        and redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    )
    assert any(v.endswith(":/data") for v in redis["volumes"])
    replicas = engine_services()
    assert len(replicas) == 2
    for name, service in replicas.items():
        cfg = check_engine_env(service["environment"], f"compose {name}")
        assert cfg.store_url == "redis://redis:6379/0"
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        grace = float(service["stop_grace_period"].rstrip("s"))
        assert grace > SHUTDOWN_S, f"{name}: stop_grace_period {grace} s <= shutdown {SHUTDOWN_S} s"
        container_ports = {int(p.split(":")[1]) for p in service["ports"]}
        assert container_ports == {cfg.http_port, cfg.grpc_port}


def test_compose_model_step_uses_real_commands() -> None:
    model = compose()["services"]["model"]
    (script,) = model["command"]
    check_engine_commands(script, "compose model")
    assert "/models/flan-t5-small" in script
    replica = next(iter(engine_services().values()))
    assert replica["environment"]["ENGINE_MODEL_DIR"] == "/models/flan-t5-small"


def test_compose_mounts_exist_and_prometheus_scrapes_both_replicas() -> None:
    services = compose()["services"]
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            assert (DEPLOY / source).exists(), f"{name} mounts {source}, which does not exist"
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "compose.yml").read_text())
    targets = {t for job in scrape["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    expected = {f"{name}:{Config().http_port}" for name in engine_services()}
    assert targets == expected
    assert all(job.get("metrics_path", "/metrics") in app_paths() for job in scrape["scrape_configs"])


def test_grafana_provisioning_matches_the_dashboard_and_compose() -> None:
    services = compose()["services"]
    datasources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    (ds,) = datasources["datasources"]
    assert ds["type"] == "prometheus" and ds["isDefault"] is True
    assert ds["url"] == "http://prometheus:9090" and "prometheus" in services
    providers = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/flan-t5-engine.yaml").read_text())
    (provider,) = providers["providers"]
    dashboard_mount = next(
        v for v in services["grafana"]["volumes"] if v.startswith("./grafana/dashboard.json:")
    )
    assert Path(dashboard_mount.split(":")[1]).parent == Path(provider["options"]["path"])


# ---- Kubernetes -------------------------------------------------------------------------------


def manifests() -> dict[tuple[str, str], dict[str, Any]]:
    docs: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                assert {"apiVersion", "kind", "metadata"} <= set(doc), path
                docs[(doc["kind"], doc["metadata"]["name"])] = doc
    return docs


def engine_container() -> tuple[dict[str, Any], dict[str, Any]]:
    deployment = manifests()[("Deployment", "flan-t5-engine")]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "engine"]
    return pod, container


def test_k8s_env_is_config_and_ports_match() -> None:
    _, container = engine_container()
    env = {e["name"]: e["value"] for e in container["env"]}
    cfg = check_engine_env(env, "k8s Deployment")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": cfg.http_port, "grpc": cfg.grpc_port}
    assert cfg.http_host == "0.0.0.0" and cfg.grpc_host == "0.0.0.0"
    assert cfg.public_url, "behind a Service, responseUrl needs --public-url"
    redis_host = cfg.store_url.split("//")[1].split(":")[0]
    assert ("Service", redis_host) in manifests()
    assert build_parser().parse_args(container["args"]).command == "serve"


def test_k8s_probes_exist_in_the_app() -> None:
    _, container = engine_container()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    paths = app_paths()
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("livenessProbe", "readinessProbe"):
        http = container[probe]["httpGet"]
        assert http["path"] in paths and http["port"] in ports, probe
    # The gRPC probe asks grpc.health.v1, which the server registers (engine/api/grpc_service.py).
    assert container["startupProbe"]["grpc"]["port"] == ports["grpc"]
    assert "add_HealthServicer_to_server" in (ROOT / "engine/api/grpc_service.py").read_text()


def test_k8s_grace_period_exceeds_the_shutdown() -> None:
    pod, container = engine_container()
    pause = 0.0
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    if pre_stop[:1] == ["sleep"]:
        pause = float(pre_stop[1])
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > pause + SHUTDOWN_S, f"grace {grace} s <= preStop {pause} s + shutdown {SHUTDOWN_S} s"


def test_k8s_model_init_uses_real_commands() -> None:
    pod, container = engine_container()
    (init,) = pod["initContainers"]
    check_engine_commands(init["args"][0], "k8s initContainer")
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["ENGINE_MODEL_DIR"] in init["args"][0]


def test_k8s_service_pdb_scrape_and_redis() -> None:
    docs = manifests()
    deployment = docs[("Deployment", "flan-t5-engine")]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = docs[("Service", "flan-t5-engine")]
    assert service["spec"]["selector"].items() <= labels.items()
    _, container = engine_container()
    names = {p["name"] for p in container["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} == names
    pdb = docs[("PodDisruptionBudget", "flan-t5-engine")]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] in app_paths()
    assert int(annotations["prometheus.io/port"]) == next(
        p["containerPort"] for p in container["ports"] if p["name"] == "http"
    )
    redis = docs[("StatefulSet", "flan-t5-engine-redis")]
    (redis_container,) = redis["spec"]["template"]["spec"]["containers"]
    args = redis_container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    redis_service = docs[("Service", "flan-t5-engine-redis")]
    assert (
        redis_service["spec"]["selector"].items() <= redis["spec"]["template"]["metadata"]["labels"].items()
    )


def test_scrape_configs_pass_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool missing (Debian package prometheus; `make system-deps`)")
    for path in sorted((DEPLOY / "prometheus").glob("*.yml")):
        proc = subprocess.run(
            [promtool, "check", "config", str(path)], capture_output=True, text=True, check=False
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
