"""The benchmark suite's logic (benchmarks/suite/): the matrix, figures, speedups, the issue's
verdicts, the floor, the report and plots on made-up measurements; then one tiny real run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import run_all
from benchmarks.suite.figures import Measurement, aggregate, speedup, speedups_for
from benchmarks.suite.floor import Floor, floor_for, weight_bytes, weights_per_step
from benchmarks.suite.matrix import STRATEGIES, TARGETS, Job, Kind, build_plan
from benchmarks.suite.plots import plot_shape
from benchmarks.suite.report import issue_checks, render
from benchmarks.suite.runner import rotated
from engine.errors import InvalidRequest
from engine.model.shapes import TINY_FLAN, preset
from engine.runtime import qlinear

GREEDY, CONTRASTIVE, BEAM = STRATEGIES["greedy"], STRATEGIES["contrastive"], STRATEGIES["beam4"]
INT8 = TARGETS["cpu-int8"]


# -------------------------------------------------------------------------------------- matrix
def test_quick_preset_on_a_machine_without_gpu() -> None:
    plan = build_plan("quick", cuda_devices=0)
    assert plan.shapes == ("small",)
    assert [s.name for s in plan.strategies] == ["greedy", "contrastive", "beam4"]
    assert plan.concurrency == (1, 4, 16)
    assert [t.name for t in plan.targets] == ["cpu-int8", "cpu-float32"]
    assert {s.what for s in plan.skipped} == {"cuda-float16", "cuda-bfloat16", "cuda-int8_float16"}
    assert all("no CUDA device" in s.reason for s in plan.skipped)
    jobs = plan.jobs("small")
    keys = [j.key for j in jobs]
    assert len(keys) == len(set(keys))
    servers = [j for j in jobs if j.kind is Kind.SERVER]
    assert len(servers) == 2 * 3 * 3  # targets x strategies x concurrency
    hf = [j for j in jobs if j.kind is Kind.HF]
    assert [(j.strategy.name, j.concurrency, j.target) for j in hf] == [
        ("greedy", 1, None),
        ("contrastive", 1, None),
    ]
    assert not [j for j in jobs if j.kind is Kind.CT2 and j.strategy is CONTRASTIVE]  # CTranslate2 cannot
    assert {j.concurrency for j in jobs if j.kind is Kind.SERVER_B1} == {16}
    assert {j.target for j in jobs if j.kind is Kind.SERVER_B1} == {INT8}
    assert {j.concurrency for j in jobs if j.kind is Kind.ENGINE} == {1, 16}


def test_cuda_targets_join_when_a_gpu_is_seen() -> None:
    plan = build_plan("full", cuda_devices=1)
    assert [t.name for t in plan.targets] == list(TARGETS)
    assert plan.skipped == ()
    assert plan.shapes == ("small", "base", "large") and plan.concurrency == (1, 4, 16, 64)
    assert plan.b1_concurrency == plan.concurrency == plan.engine_concurrency


def test_every_request_forces_the_same_number_of_new_tokens() -> None:
    assert GREEDY.request_params(64) == {"max_new_tokens": 64, "min_new_tokens": 64}
    assert CONTRASTIVE.request_params(64) == {
        "penalty_alpha": 0.6,
        "top_k": 4,
        "max_new_tokens": 64,
        "min_new_tokens": 64,
    }
    assert BEAM.request_params(8)["num_beams"] == 4


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"shapes": ["medium"]}, "unknown shape 'medium'"),
        ({"strategies": ["greedy", "topk"]}, "unknown strategy 'topk'"),
        ({"targets": ["tpu-int4"]}, "unknown target 'tpu-int4'"),
        ({"concurrency": [0, 4]}, "concurrency levels must be at least 1"),
        ({"requests": 0}, "requests must be at least 1"),
        ({"baselines": ["vllm"]}, "unknown baseline 'vllm'"),
        ({"targets": ["cuda-float16"]}, "none of the targets cuda-float16 can run here"),
    ],
)
def test_bad_choices_are_refused_with_what_to_fix(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        build_plan("quick", cuda_devices=0, **overrides)  # type: ignore[arg-type]


def test_overrides_and_missing_reference_venv() -> None:
    plan = build_plan(
        "quick",
        cuda_devices=0,
        concurrency=[4, 1, 4],
        hf_available=False,
        baselines=["transformers", "ctranslate2"],
    )
    assert plan.concurrency == (1, 4)
    assert plan.b1_concurrency == (4,)  # the preset's 16 is gone: the highest level left
    assert plan.baselines == frozenset({Kind.CT2})
    assert any(s.what == "transformers baseline" and "make ref" in s.reason for s in plan.skipped)
    assert not [j for j in plan.jobs("small") if j.kind in (Kind.HF, Kind.SERVER_B1)]
    assert build_plan("quick", cuda_devices=0, baselines=[]).baselines == frozenset()


def test_onnxruntime_peer_runs_greedy_at_the_engine_levels_or_is_skipped() -> None:
    plan = build_plan("quick", cuda_devices=0, baselines=["onnxruntime"])
    onnx = [j for j in plan.jobs("small") if j.kind is Kind.ONNX]
    assert {j.strategy.name for j in onnx} == {"greedy"}  # its loop is greedy only
    assert sorted(j.concurrency for j in onnx) == sorted(plan.engine_concurrency)
    assert all(j.target is None and j.contender == "onnxruntime int8" for j in onnx)
    missing = build_plan("quick", cuda_devices=0, baselines=["onnxruntime"], onnx_available=False)
    assert Kind.ONNX not in missing.baselines
    assert any(s.what == "onnxruntime baseline" and "make onnx" in s.reason for s in missing.skipped)


def test_onnxruntime_speedup_pairs_the_same_concurrency() -> None:
    ours = Job(Kind.ENGINE, INT8, "small", GREEDY, 16)
    ms = [
        measurement(ours, 0, [1.0] * 16, duration=2.0),
        measurement(Job(Kind.ONNX, None, "small", GREEDY, 16), 0, [1.0] * 16, duration=5.0),
        measurement(Job(Kind.ONNX, None, "small", GREEDY, 1), 0, [1.0] * 16, duration=50.0),
    ]
    assert speedups_for(ours.key, ms).vs_onnxruntime == 2.5


def test_rotation_runs_each_job_once_per_round_from_a_different_start() -> None:
    jobs = build_plan("quick", cuda_devices=0).jobs("small")
    orders = [rotated(jobs, r, 3) for r in range(3)]
    for order in orders:
        assert sorted(j.key for j in order) == sorted(j.key for j in jobs)
    assert len({order[0].key for order in orders}) == 3


# -------------------------------------------------------------------------------------- figures
def measurement(
    job: Job,
    round_: int,
    latencies: list[float],
    duration: float,
    tokens_per_request: int = 64,
    failures: int = 0,
) -> Measurement:
    return Measurement.of(
        job,
        round_,
        requests=len(latencies) + failures,
        latencies_s=latencies,
        duration_s=duration,
        new_tokens=tokens_per_request * len(latencies),
        failures=["500: boom"] * failures,
    )


def test_figures_pool_latencies_and_take_median_throughput() -> None:
    job = Job(Kind.SERVER, INT8, "small", GREEDY, 4)
    ms = [
        measurement(job, 0, [float(i) for i in range(1, 11)], duration=10.0),  # 64 tokens/s
        measurement(job, 1, [float(i) for i in range(11, 21)], duration=5.0),  # 128 tokens/s
        measurement(job, 2, [100.0], duration=20.0, failures=1),  # 3.2 tokens/s
    ]
    (f,) = aggregate(ms)
    assert (f.requests, f.ok, f.failed, f.rounds) == (22, 21, 1, 3)
    assert f.p50_ms == 11000.0 and f.p90_ms == 19000.0 and f.p99_ms == 100000.0
    assert f.tokens_per_s == 64.0  # median of 64, 128, 3.2
    assert f.requests_per_s == 1.0
    assert f.tpot_ms == pytest.approx(11000.0 / 64)


def test_speedup_is_the_median_of_paired_rounds() -> None:
    ours_job = Job(Kind.SERVER, INT8, "small", GREEDY, 16)
    hf_job = Job(Kind.HF, None, "small", GREEDY, 1)
    ours = [measurement(ours_job, r, [1.0] * 16, duration=d) for r, d in enumerate([2.0, 4.0, 1.0])]
    hf = [measurement(hf_job, r, [1.0] * 16, duration=d) for r, d in enumerate([10.0, 40.0, 3.0])]
    assert speedup(ours, hf) == 5.0  # ratios 5, 10, 3
    assert speedup(ours, hf[:1]) == 5.0  # only the round both ran
    assert speedup(ours, []) is None
    s = speedups_for(ours_job.key, ours + hf)
    assert s.vs_transformers == 5.0 and s.vs_ctranslate2 is None and s.vs_server_b1 is None


def test_ctranslate2_and_b1_baselines_compare_at_the_same_target_and_concurrency() -> None:
    ours = Job(Kind.SERVER, INT8, "small", GREEDY, 16)
    ct2_same = Job(Kind.CT2, INT8, "small", GREEDY, 16)
    ct2_other = Job(Kind.CT2, INT8, "small", GREEDY, 4)
    b1 = Job(Kind.SERVER_B1, INT8, "small", GREEDY, 16)
    ms = [
        measurement(ours, 0, [1.0] * 16, duration=2.0),
        measurement(ct2_same, 0, [1.0] * 16, duration=1.0),
        measurement(ct2_other, 0, [1.0] * 16, duration=8.0),
        measurement(b1, 0, [1.0] * 16, duration=6.0),
    ]
    s = speedups_for(ours.key, ms)
    assert s.vs_ctranslate2 == 0.5 and s.vs_server_b1 == 3.0


def issue_measurements(greedy_ratio: float, contrastive_ratio: float | None) -> list[Measurement]:
    ms = []
    for strategy, ratio in ((GREEDY, greedy_ratio), (CONTRASTIVE, contrastive_ratio)):
        if ratio is None:
            continue
        for r in range(2):
            ms.append(
                measurement(Job(Kind.SERVER, INT8, "small", strategy, 16), r, [1.0] * 16, duration=10.0)
            )
            ms.append(
                measurement(Job(Kind.HF, None, "small", strategy, 1), r, [1.0] * 16, duration=10.0 * ratio)
            )
    # A faster server at another concurrency must not count for the target.
    ms.append(measurement(Job(Kind.SERVER, INT8, "small", GREEDY, 4), 0, [1.0] * 16, duration=0.1))
    return ms


def test_issue_targets_pass_fail_and_not_measured() -> None:
    plan = build_plan("quick", cuda_devices=0, targets=["cpu-int8"])
    checks = {c.strategy: c for c in issue_checks(plan, issue_measurements(4.5, 2.5))}
    assert checks["greedy"].ratio == pytest.approx(4.5) and checks["greedy"].verdict == "PASS"
    assert checks["contrastive"].ratio == pytest.approx(2.5) and checks["contrastive"].verdict == "FAIL"
    assert checks["greedy"].server_tokens_per_s == pytest.approx(16 * 64 / 10.0)
    checks = {c.strategy: c for c in issue_checks(plan, issue_measurements(3.9, None))}
    assert checks["greedy"].verdict == "FAIL"
    assert checks["contrastive"].ratio is None and checks["contrastive"].verdict == "not measured"


def test_report_states_verdicts_skips_and_failures(tmp_path: Path) -> None:
    plan = build_plan("quick", cuda_devices=0, targets=["cpu-int8", "cuda-float16"])
    ms = issue_measurements(4.5, 2.5)
    ms.append(measurement(Job(Kind.ENGINE, INT8, "small", GREEDY, 1), 0, [0.5] * 3, duration=1.5, failures=2))
    png = plot_shape(plan, "small", ms, tmp_path / "plot-small.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = render(
        run_id="r1",
        command="benchmarks/run_all.py --preset quick",
        plan=plan,
        machine={"cpu": "test CPU", "bandwidth_gb_per_s": 10.0},
        load_before=[1.0, 1.0, 1.0],
        load_after=[2.0, 2.0, 2.0],
        measurements=ms,
        plots=["plot-small.png"],
        notes=["a note"],
    )
    summary = text.split("## Machine")[0]
    assert "| greedy (>= 4x)" in summary and "4.50x" in summary and "PASS" in summary
    assert "| contrastive (>= 3x)" in summary and "2.50x" in summary and "FAIL" in summary
    assert "- cuda-float16: no CUDA device" in text
    assert "engine-only cpu-int8, small greedy c=1 round 0: 500: boom" in text
    assert "![plot-small.png](plot-small.png)" in text and "- a note" in text
    # engine-only at 0.5 s for 64 tokens = 7.8 ms per step against the int8 floor
    floor = floor_for("small", INT8, GREEDY, 10.0)
    assert f"{100 * floor.fraction(500 / 64):.0f}%" in text.split("## small, greedy")[1].split("## ")[0]


# -------------------------------------------------------------------------------------- floor
def test_weights_per_step_counts_the_tensors_a_decoder_step_reads() -> None:
    from safetensors import safe_open

    from tests.models import hf_checkpoint

    counted = 0
    with safe_open(str(hf_checkpoint("flan") / "model.safetensors"), framework="numpy") as f:
        for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            shape = f.get_slice(name).get_shape()
            per_step = name == "lm_head.weight" or (
                name.startswith("decoder.block.")
                and len(shape) == 2
                and "relative_attention_bias" not in name
                and not name.endswith(("EncDecAttention.k.weight", "EncDecAttention.v.weight"))
            )
            if per_step:
                counted += shape[0] * shape[1]
    assert weights_per_step(TINY_FLAN) == counted


def test_floor_bytes_follow_the_compute_type_and_the_decoder() -> None:
    assert weight_bytes(INT8, GREEDY) == 1
    assert weight_bytes(TARGETS["cpu-float32"], BEAM) == 4
    # our decoder's kernel reads int8 as stored; numpy alone holds float32 weights
    assert weight_bytes(INT8, CONTRASTIVE) == (1 if qlinear.kernel_available() else 4)
    assert weight_bytes(TARGETS["cpu-float32"], CONTRASTIVE) == 4
    assert weight_bytes(TARGETS["cuda-float16"], CONTRASTIVE) == 2
    assert weight_bytes(TARGETS["cuda-bfloat16"], CONTRASTIVE) == 4  # no bfloat16 in CuPy: float32
    assert weight_bytes(TARGETS["cuda-bfloat16"], GREEDY) == 2
    small = weights_per_step(preset("small"))
    assert 38e6 < small < 39e6  # 8 layers of 2.75 M + a 32128 x 512 lm_head
    floor = floor_for("small", INT8, GREEDY, bandwidth_gb_per_s=10.0)
    assert floor.ms_per_step == pytest.approx(small / 1e7)
    assert Floor(1_000_000, 1.0).fraction(2.0) == 0.5


# -------------------------------------------------------------------------------------- a real run
def test_tiny_run_through_the_real_server(tmp_path: Path) -> None:
    """Builds a tiny model, starts `engine serve`, runs every contender once: < 60 s on 2 cores."""
    code = run_all.main(
        [
            "--shapes", "tiny",
            "--strategies", "greedy",
            "--concurrency", "1", "2",
            "--targets", "cpu-int8",
            "--baselines", "ctranslate2", "transformers",
            "--requests", "2",
            "--rounds", "1",
            "--new-tokens", "6",
            "--prompt-tokens", "12",
            "--out", str(tmp_path / "out"),
            "--models", str(tmp_path / "models"),
            "--run-id", "smoke",
            "--no-progress",
        ]
    )  # fmt: skip
    assert code == 0
    out = tmp_path / "out" / "smoke"
    runs = sorted(p.name for p in (out / "runs").glob("*.json"))
    assert runs == sorted(
        [
            "tiny-greedy-server-cpu-int8-c1-r0.json",
            "tiny-greedy-server-cpu-int8-c2-r0.json",
            "tiny-greedy-engine-only-cpu-int8-c1-r0.json",
            "tiny-greedy-ctranslate2-cpu-int8-c1-r0.json",
            "tiny-greedy-ctranslate2-cpu-int8-c2-r0.json",
            "tiny-greedy-transformers-c1-r0.json",
        ]
    )
    for name in runs:
        m = json.loads((out / "runs" / name).read_text())
        assert (m["requests"], m["ok"], m["failures"]) == (2, 2, []), name
        assert m["new_tokens"] == 2 * 6, name  # counted from the answers, every contender
    summary = json.loads((out / "summary.json").read_text())
    assert summary["machine"]["bandwidth_gb_per_s"] > 0
    assert {c["verdict"] for c in summary["issue_targets"]} == {"not measured"}  # tiny is not small
    report = (out / "report.md").read_text()
    assert "## tiny, greedy" in report and "Transformers 4.55" in report
    assert (out / "plot-tiny.png").is_file()
    assert "ready: REST" in (out / "logs" / "tiny-server-cpu-int8.log").read_text()
    assert run_all.main(["--shapes", "tiny", "--out", str(tmp_path / "out"), "--run-id", "smoke"]) == 2
    # The report rebuilt from the saved JSON alone has the same tables.
    (out / "report.md").unlink()
    assert run_all.main(["--report-from", str(out)]) == 0
    rebuilt = (out / "report.md").read_text()
    assert (
        rebuilt.split("## tiny, greedy")[1].split("## Floor")[0]
        == report.split("## tiny, greedy")[1].split("## Floor")[0]
    )
    assert "report rebuilt from 6 saved measurements (rounds 1 of 1)" in rebuilt
    assert run_all.main(["--report-from", str(tmp_path)]) == 2  # not a run folder
