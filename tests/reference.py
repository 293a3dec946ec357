"""Ask the Hugging Face reference (scripts/reference.py in .venv-ref) for generated ids."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
REF_PYTHON = ROOT / ".venv-ref" / "bin" / "python"


def reference_available() -> bool:
    return REF_PYTHON.exists()


def run_reference(hf_dir: Path, cases: list[dict[str, Any]], timeout_s: float = 900) -> list[list[list[int]]]:
    """``cases``: [{"input_ids": [[...]], "params": {...}}] -> per case, per prompt, generated ids."""
    outputs: list[list[list[int]]] = run_script("reference.py", hf_dir, cases, timeout_s)
    return outputs


def run_script(script: str, hf_dir: Path, cases: list[dict[str, Any]], timeout_s: float = 900) -> Any:
    """The ``outputs`` of one of scripts/reference*.py run in .venv-ref on ``cases``."""
    if not reference_available():
        if "CI" in __import__("os").environ:
            raise RuntimeError(f"{REF_PYTHON} missing: run `make ref`")
        pytest.skip(f"{REF_PYTHON} missing: run `make ref`")
    proc = subprocess.run(
        [str(REF_PYTHON), str(ROOT / "scripts" / script)],
        input=json.dumps({"model": str(hf_dir), "cases": cases}),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise RuntimeError(f"reference failed with exit code {proc.returncode}")
    return json.loads(proc.stdout)["outputs"]
