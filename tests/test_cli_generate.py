"""`engine generate` through the real command line, in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.runtime.engine import Engine

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_generate_json_shape_and_ids(flan_model_dir: Path) -> None:
    prompts = ["Translate to German: hello", "a longer prompt about the weather in the mountains"]
    params = {"max_new_tokens": 12, "num_beams": 2}
    proc = run_cli(
        "generate",
        "--model",
        str(flan_model_dir),
        "--prompt",
        prompts[0],
        "--prompt",
        prompts[1],
        "--params",
        json.dumps(params),
        "--compute-type",
        "float32",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(out) == {"completion", "token_ids", "usage"}
    expected = Engine(flan_model_dir, compute_type="float32").generate(prompts, **params)
    assert out["token_ids"] == [list(r.token_ids) for r in expected]
    assert out["completion"] == [r.text for r in expected]
    prompt_tokens = sum(r.usage.prompt_tokens for r in expected)
    completion_tokens = sum(len(ids) for ids in out["token_ids"])
    assert out["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def test_generate_plain_prints_one_line_per_prompt(flan_model_dir: Path) -> None:
    proc = run_cli(
        "generate",
        "--model",
        str(flan_model_dir),
        "-p",
        "one",
        "-p",
        "two",
        "--params",
        '{"max_new_tokens": 4}',
    )
    assert proc.returncode == 0, proc.stderr
    expected = Engine(flan_model_dir).generate(["one", "two"], max_new_tokens=4)
    assert proc.stdout.split("\n")[:2] == [r.text for r in expected]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--params", "{max_new_tokens: 3}"], "error: --params is not valid JSON"),
        (["--params", '{"beams": 2}'], "error: unknown parameter(s) beams"),
        (["--params", '{"max_new_tokens": 0}'], "error: max_new_tokens must be between 1 and 512, got 0"),
        (["--params", "[1, 2]"], "error: params must be a JSON object"),
        (["--prompt", "kebupi tifudo " * 600], "more than the model's limit of 512"),
        (["--compute-type", "float64"], "error: compute type 'float64' is not supported on cpu"),
    ],
    ids=["bad-json", "unknown-param", "out-of-range", "not-an-object", "too-long", "compute-type"],
)
def test_generate_errors_exit_2_with_one_line(flan_model_dir: Path, args: list[str], message: str) -> None:
    proc = run_cli("generate", "--model", str(flan_model_dir), "--prompt", "hello", *args)
    assert proc.returncode == 2
    # One error line, last; anything before it is a log line (the demo model's random-weights warning).
    lines = proc.stderr.strip().splitlines()
    assert message in lines[-1]
    assert [line for line in lines if line.startswith("error:")] == [lines[-1]]
    assert all(" WARNING " in line for line in lines[:-1]), proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_generate_missing_model_folder(tmp_path: Path) -> None:
    proc = run_cli("generate", "--model", str(tmp_path / "nowhere"), "--prompt", "hello")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: model folder {tmp_path / 'nowhere'} does not exist. Make one with "
        "`engine convert SOURCE --output DIR` or `engine demo-model --output DIR`"
    ]
