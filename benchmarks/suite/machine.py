"""The machine a run measured: CPU, cores, memory, measured memory bandwidth, GPU and driver, versions."""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import machine as common_machine

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Bandwidth:
    """Copy bandwidth (bytes read + bytes written per second), best of ``repeats``, one thread:
    what one decoding thread streaming weights can hope for."""

    gb_per_s: float
    buffer_mib: int
    repeats: int


def measure_bandwidth(buffer_mib: int = 512, repeats: int = 5) -> Bandwidth:
    import numpy as np

    a = np.ones(buffer_mib * 1024 * 1024 // 4, dtype=np.float32)  # past any cache
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - start)
    return Bandwidth(2 * a.nbytes / best / 1e9, buffer_mib, repeats)


def memory_gib() -> float:
    return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)


def gpus() -> list[dict[str, str]]:
    """``nvidia-smi``'s view (name, memory, driver); empty where there is none."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=False,
            timeout=20,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    rows = []
    for line in out.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            rows.append({"name": parts[0], "memory": parts[1], "driver": parts[2]})
    return rows


def reference_versions() -> dict[str, str]:
    """Transformers and torch in .venv-ref (the baseline's own versions), asked in a subprocess."""
    python = ROOT / ".venv-ref" / "bin" / "python"
    if not python.is_file():
        return {}
    code = "import torch, transformers; print(torch.__version__, transformers.__version__)"
    try:
        out = subprocess.run(
            [str(python), "-c", code], capture_output=True, text=True, timeout=120, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return {}
    torch_v, transformers_v = out.stdout.split()
    return {"torch": torch_v, "transformers": transformers_v}


def describe(bandwidth: Bandwidth) -> dict[str, Any]:
    info = common_machine()
    info["memory_gib"] = memory_gib()
    info["bandwidth_gb_per_s"] = round(bandwidth.gb_per_s, 2)
    info["bandwidth_method"] = (
        f"numpy copy of {bandwidth.buffer_mib} MiB, one thread, best of {bandwidth.repeats}, read + write bytes"
    )
    info["gpus"] = gpus()
    try:
        import ctranslate2

        info["cuda_devices"] = ctranslate2.get_cuda_device_count()
    except ImportError:
        info["cuda_devices"] = 0
    info["reference_venv"] = reference_versions()
    for module in ("grpc", "fastapi", "uvicorn"):
        try:
            info[module] = __import__(module).__version__
        except (ImportError, AttributeError):
            continue
    return info
