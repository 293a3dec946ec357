"""deploy/: the Grafana dashboard imports as is and queries only metrics the server exports; the
Prometheus scrape config passes promtool."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from engine.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboard.json"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
METRIC = re.compile(r"\b(?:engine|process)_[a-z_]+")
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p["targets"]]


def dashboard_metrics() -> set[str]:
    """Series names the dashboard queries (histograms by their _bucket/_sum/_count series)."""
    return {m for expr in dashboard_exprs() for m in METRIC.findall(expr)}


def exported_series(metrics: Metrics) -> set[str]:
    names: set[str] = set()
    for family in metrics.registry.collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
        names.update(family.name + s for s in suffixes)
    return names


def test_dashboard_is_importable_as_is() -> None:
    d = dashboard()
    assert d["uid"] and d["title"] and d["schemaVersion"] >= 30
    assert d["id"] is None  # Grafana assigns it on import
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    for p in d["panels"]:
        assert p["datasource"] == DATASOURCE, p["title"]
        for t in p["targets"]:
            assert t.get("datasource", DATASOURCE) == DATASOURCE, p["title"]
        assert p["targets"], p["title"]
        assert {"x", "y", "w", "h"} <= set(p["gridPos"])
        for t in p["targets"]:
            assert t["expr"].count("(") == t["expr"].count(")"), t["expr"]


def test_dashboard_loads_by_file_provisioning() -> None:
    """No import placeholder (file provisioning cannot fill one): a datasource variable instead,
    which Grafana sets to the default Prometheus (deploy/grafana/provisioning provides one)."""
    d = dashboard()
    assert "__inputs" not in d
    assert "${DS_" not in DASHBOARD.read_text()
    (variable,) = [v for v in d["templating"]["list"] if v["type"] == "datasource"]
    assert variable["name"] == "datasource" and variable["query"] == "prometheus"


def test_queue_depth_takes_max_over_replicas() -> None:
    """Every replica on a shared store reports the shared queue: summing would count it N times."""
    exprs = dashboard_exprs()
    assert any(e.startswith("max(engine_queue_depth") for e in exprs), exprs
    assert not any(re.search(r"\b(sum|avg)\b[^)]*engine_queue_depth", e) for e in exprs), exprs


def test_dashboard_covers_what_operators_need() -> None:
    titles = " | ".join(p["title"].lower() for p in dashboard()["panels"])
    for words in (
        "queue depth",
        "jobs running",
        "latency",
        "queue wait",
        "batch size",
        "tokens/s",
        "time per output token",
        "errors by code",
    ):
        assert words in titles, words
    exprs = "\n".join(dashboard_exprs())
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}, sum by (le) (rate(engine_request_latency_seconds_bucket" in exprs


def test_every_dashboard_metric_is_exported() -> None:
    exported = exported_series(Metrics())
    missing = dashboard_metrics() - exported
    assert not missing, missing


def test_prometheus_config_passes_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool missing (Debian package prometheus; `make system-deps`)")
    proc = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_process_metrics_are_exported_on_the_servers_registry() -> None:
    text = Metrics().render().decode()
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds"):
        assert f"\n{name} " in text, name
