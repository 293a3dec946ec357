"""A run: for each shape, start every contender once, warm each up, then time every job of the
plan in rounds, the order rotated each round so that no contender always runs first (or right after
the heaviest one). Every measurement is written as JSON the moment it is taken, so an interrupted
run keeps what it measured.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from benchmarks.common import cores
from benchmarks.suite import contenders as c
from benchmarks.suite.figures import Measurement
from benchmarks.suite.machine import describe, measure_bandwidth
from benchmarks.suite.matrix import STRATEGIES, Job, Kind, Plan, Skipped, Strategy, Target
from benchmarks.suite.plots import plot_shape
from benchmarks.suite.report import figures_json, issue_checks, render, summary_table
from benchmarks.suite.workloads import MODELS, ModelSet, Prompt, ensure_models, make_prompts

WARMUP_TOKENS = 4
THREAD_PROBE_TOKENS = 16


class Contender(Protocol):
    def run(
        self, prompts: Sequence[Prompt], params: dict[str, Any], requests: int, concurrency: int
    ) -> c.CellResult: ...


@dataclass(frozen=True)
class RunOutput:
    out_dir: Path
    report: Path
    summary: str
    failed_requests: int


def rotated(jobs: Sequence[Job], round_: int, rounds: int) -> list[Job]:
    """The jobs starting at a different place each round (evenly spread over the rounds)."""
    if not jobs:
        return []
    shift = (round_ * len(jobs) // max(1, rounds)) % len(jobs)
    return [*jobs[shift:], *jobs[:shift]]


def _who(job: Job) -> tuple[Kind, str | None]:
    return job.kind, None if job.target is None else job.target.name


@contextlib.contextmanager
def open_contenders(
    plan: Plan, jobs: Sequence[Job], models: ModelSet, logs: Path
) -> Iterator[dict[tuple[Kind, str | None], Contender]]:
    """Every contender the jobs need, started once; servers and subprocesses stopped on the way out."""
    opened: dict[tuple[Kind, str | None], Contender] = {}
    servers: list[tuple[str, c.Server]] = []
    timers: list[c.TransformersTimer | c.OnnxRuntimeTimer] = []
    try:
        for job in jobs:
            who = _who(job)
            if who in opened:
                continue
            if job.kind is Kind.HF:
                timers.append(c.TransformersTimer(models.hf_dir))
                opened[who] = timers[-1]
                continue
            if job.kind is Kind.ONNX:
                timers.append(c.OnnxRuntimeTimer(models.hf_dir, cores(), models.hf_dir.parent / "onnx"))
                opened[who] = timers[-1]
                continue
            assert job.target is not None
            folder = models.folder(job.target.model_quantization)
            if job.kind in (Kind.SERVER, Kind.SERVER_B1):
                server = c.Server(
                    folder, job.target, max_batch_size=1 if job.kind is Kind.SERVER_B1 else None
                )
                servers.append((f"{models.shape}-{job.contender.replace(' ', '-')}", server))
                opened[who] = server
            elif job.kind is Kind.ENGINE:
                opened[who] = c.EngineOnly(folder, job.target)
            else:
                opened[who] = c.Ct2Direct(folder, job.target)
        yield opened
    finally:
        for name, server in servers:
            tail = server.log_tail()
            if server.stop(keep_log=logs / f"{name}.log") != 0:
                print(f"a server exited with an error; its log ends with:\n{tail}", flush=True)
        for timer in timers:
            timer.stop()


def only_running(
    opened: dict[tuple[Kind, str | None], Contender], who: tuple[Kind, str | None] | None
) -> None:
    """Resume the server ``who`` (None: every server) and pause every other one."""
    for key, contender in opened.items():
        if isinstance(contender, c.Server):
            if who is None or key == who:
                contender.resume()
            else:
                contender.pause()


def measure(
    contender: Contender, job: Job, round_: int, plan: Plan, prompts: Sequence[Prompt]
) -> Measurement:
    params = job.strategy.request_params(plan.new_tokens)
    try:
        result = contender.run(prompts, params, plan.requests, job.concurrency)
    except Exception as exc:
        return Measurement.of(
            job,
            round_,
            requests=plan.requests,
            latencies_s=(),
            duration_s=0.0,
            new_tokens=0,
            failures=(f"{type(exc).__name__}: {exc}",),
        )
    return Measurement.of(
        job,
        round_,
        requests=plan.requests,
        latencies_s=result.latencies_s,
        duration_s=result.duration_s,
        new_tokens=result.new_tokens,
        failures=result.failures,
    )


def run(
    plan: Plan, out_dir: Path, *, command: str, models: Path = MODELS, progress: bool = True
) -> RunOutput:
    from tqdm import tqdm  # type: ignore[import-untyped]

    runs_dir = out_dir / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    load_before = [round(x, 2) for x in os.getloadavg()]
    machine = describe(measure_bandwidth())
    _write(out_dir / "machine.json", machine)
    _write(out_dir / "plan.json", _plan_dict(plan))
    _write(out_dir / "run.json", {"command": command, "load_before": load_before})
    measurements: list[Measurement] = []
    notes: list[str] = []
    total = sum(len(plan.jobs(shape)) for shape in plan.shapes) * plan.rounds
    with tqdm(total=total, disable=not progress, unit="cell", dynamic_ncols=True) as bar:
        for shape in plan.shapes:
            bar.set_description(f"{shape}: models")
            model_set = ensure_models(shape, {t.model_quantization for t in plan.targets}, models=models)
            prompts = make_prompts(
                model_set.folder(plan.targets[0].model_quantization),
                min(plan.requests, 16),
                plan.prompt_tokens,
            )
            _write(out_dir / f"prompts-{shape}.json", [{"text": p.text, "ids": list(p.ids)} for p in prompts])
            jobs = plan.jobs(shape)
            bar.set_description(f"{shape}: starting")
            with open_contenders(plan, jobs, model_set, out_dir / "logs") as opened:
                bar.set_description(f"{shape}: warm-up")
                warmed: set[tuple[tuple[Kind, str | None], str]] = set()
                hf = opened.get((Kind.HF, None))
                if isinstance(hf, c.TransformersTimer):
                    probe = STRATEGIES["greedy"].request_params(THREAD_PROBE_TOKENS)
                    hf.pick_threads(prompts[0].ids, probe, (1, cores()))
                    trials = ", ".join(
                        f"{t} thread(s) {s * 1000:.0f} ms" for t, s in hf.thread_trials.items()
                    )
                    notes.append(
                        f"{shape}: Transformers {hf.info['transformers']} (torch {hf.info['torch']}) runs with "
                        f"{hf.threads} torch thread(s), the faster at warm-up ({trials}; greedy, "
                        f"{THREAD_PROBE_TOKENS} tokens, best of 2)"
                    )
                    _write(out_dir / "notes.json", notes)
                for job in jobs:
                    if (_who(job), job.strategy.name) not in warmed:
                        warmed.add((_who(job), job.strategy.name))
                        opened[_who(job)].run(prompts[:1], job.strategy.request_params(WARMUP_TOKENS), 1, 1)
                only_running(opened, (Kind.HF, None))  # every server paused
                for round_ in range(plan.rounds):
                    for job in rotated(jobs, round_, plan.rounds):
                        only_running(opened, _who(job))
                        bar.set_description(
                            f"r{round_ + 1} {shape} {job.strategy.name} c{job.concurrency} {job.contender}"
                        )
                        m = measure(opened[_who(job)], job, round_, plan, prompts)
                        measurements.append(m)
                        _write(runs_dir / f"{job.key}-r{round_}.json", _measurement_dict(m))
                        bar.update(1)
    return write_report(
        plan,
        out_dir,
        command=command,
        machine=machine,
        load_before=load_before,
        load_after=[round(x, 2) for x in os.getloadavg()],
        measurements=measurements,
        notes=notes,
    )


def write_report(
    plan: Plan,
    out_dir: Path,
    *,
    command: str,
    machine: dict[str, Any],
    load_before: Sequence[float],
    load_after: Sequence[float],
    measurements: Sequence[Measurement],
    notes: Sequence[str],
) -> RunOutput:
    """report.md, the plots and summary.json from what was measured."""
    shapes = [shape for shape in plan.shapes if any(m.shape == shape for m in measurements)]
    plots = [
        str(plot_shape(plan, shape, measurements, out_dir / f"plot-{shape}.png").relative_to(out_dir))
        for shape in shapes
    ]
    report = out_dir / "report.md"
    report.write_text(
        render(
            run_id=out_dir.name,
            command=command,
            plan=plan,
            machine=machine,
            load_before=load_before,
            load_after=load_after,
            measurements=measurements,
            plots=plots,
            notes=notes,
        )
    )
    checks = issue_checks(plan, measurements)
    _write(
        out_dir / "summary.json",
        {
            "run_id": out_dir.name,
            "command": command,
            "load_before": list(load_before),
            "load_after": list(load_after),
            "machine": machine,
            "notes": list(notes),
            "issue_targets": [{**asdict(ch), "verdict": ch.verdict} for ch in checks],
            "figures": figures_json(measurements),
        },
    )
    failed = sum(m.requests - m.ok for m in measurements)
    return RunOutput(out_dir, report, summary_table(checks), failed)


def rebuild_report(out_dir: Path) -> RunOutput:
    """The report of a run folder from its JSON files alone: for a run that was interrupted (its
    measurements are written as they are taken) or to re-render an old run."""
    plan = load_plan(json.loads((out_dir / "plan.json").read_text()))
    machine = json.loads((out_dir / "machine.json").read_text())
    run_info = json.loads((out_dir / "run.json").read_text()) if (out_dir / "run.json").is_file() else {}
    notes = json.loads((out_dir / "notes.json").read_text()) if (out_dir / "notes.json").is_file() else []
    measurements = [
        load_measurement(json.loads(p.read_text())) for p in sorted((out_dir / "runs").glob("*.json"))
    ]
    if not measurements:
        raise RuntimeError(f"{out_dir / 'runs'} holds no measurement")
    rounds_done = sorted({m.round for m in measurements})
    notes = [
        *notes,
        f"report rebuilt from {len(measurements)} saved measurements (rounds {', '.join(str(r + 1) for r in rounds_done)} "
        f"of {plan.rounds}); cells missing from a round were not measured in it",
    ]
    return write_report(
        plan,
        out_dir,
        command=run_info.get("command", f"benchmarks/run_all.py --preset {plan.preset} (see plan.json)"),
        machine=machine,
        load_before=run_info.get("load_before", machine.get("load_average_1_5_15", [])),
        load_after=[round(x, 2) for x in os.getloadavg()],
        measurements=measurements,
        notes=notes,
    )


def load_plan(d: dict[str, Any]) -> Plan:
    def strategy(s: dict[str, Any]) -> Strategy:
        return Strategy(s["name"], tuple((k, v) for k, v in s["params"]), s["on_ctranslate2"])

    return Plan(
        preset=d["preset"],
        shapes=tuple(d["shapes"]),
        strategies=tuple(strategy(s) for s in d["strategies"]),
        concurrency=tuple(d["concurrency"]),
        targets=tuple(Target(**t) for t in d["targets"]),
        requests=d["requests"],
        rounds=d["rounds"],
        engine_concurrency=tuple(d["engine_concurrency"]),
        b1_concurrency=tuple(d["b1_concurrency"]),
        hf_strategies=tuple(strategy(s) for s in d["hf_strategies"]),
        baselines=frozenset(Kind(k) for k in d["baselines"]),
        new_tokens=d["new_tokens"],
        prompt_tokens=d["prompt_tokens"],
        skipped=tuple(Skipped(**s) for s in d["skipped"]),
    )


def load_measurement(d: dict[str, Any]) -> Measurement:
    fields = {k: v for k, v in d.items() if k not in ("requests_per_s", "tokens_per_s")}
    fields["kind"] = Kind(fields["kind"])
    fields["latencies_s"] = tuple(fields["latencies_s"])
    fields["failures"] = tuple(fields["failures"])
    return Measurement(**fields)


def _plan_dict(plan: Plan) -> dict[str, Any]:
    d = asdict(plan)
    d["baselines"] = sorted(k.value for k in plan.baselines)
    return d


def _measurement_dict(m: Measurement) -> dict[str, Any]:
    d = asdict(m)
    d["kind"] = m.kind.value
    d["requests_per_s"] = m.requests_per_s
    d["tokens_per_s"] = m.tokens_per_s
    return d


def _write(path: Path, payload: Any) -> None:
    path.write_text(json.dumps(payload, indent=2) + "\n")
