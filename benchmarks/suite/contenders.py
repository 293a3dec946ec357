"""The things a run times. Each handles ``requests`` requests of one cell and returns what it saw:
per-request latencies, the wall time of the whole cell, and the generated tokens counted from the
answers (a contender that generated fewer tokens than asked shows it; nothing is assumed).

- ``Server``: `engine serve` as a subprocess on free loopback ports with its own temporary store
  and a key made by `engine keys create`; requests go through REST (submit, then long poll) from
  benchmarks/loadgen.py's closed loop, ``concurrency`` clients.
- ``EngineOnly``: ``Engine.generate_requests`` in this process, ``concurrency`` requests per call.
- ``Ct2Direct``: ``ctranslate2.Translator.translate_batch`` with the options the engine passes.
- ``TransformersTimer``: generate() in a .venv-ref subprocess (benchmarks/hf_timer.py), one request
  at a time, float32 on CPU, with the faster of 1 and all cores as torch's thread count
  (``pick_threads``); bench_contrastive.py and bench_cuda.py time whole batches with it (``time``).
- ``OnnxRuntimeTimer``: ONNX Runtime int8 in a .venv-onnx subprocess (benchmarks/onnx_timer.py),
  greedy only, in its own KV-cached loop.
Also the inputs the single-figure benchmarks share: ``forced_prompts`` and ``ct2_greedy``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import OUT_DIR, cores
from benchmarks.suite.matrix import Target
from benchmarks.suite.workloads import Prompt

ROOT = Path(__file__).resolve().parents[2]
REF_PYTHON = ROOT / ".venv-ref" / "bin" / "python"
HF_TIMER = ROOT / "benchmarks" / "hf_timer.py"
ONNX_PYTHON = ROOT / ".venv-onnx" / "bin" / "python"
ONNX_TIMER = ROOT / "benchmarks" / "onnx_timer.py"


@dataclass(frozen=True)
class CellResult:
    latencies_s: tuple[float, ...]  # successful requests only
    duration_s: float
    new_tokens: int
    failures: tuple[str, ...]


def _chunks(n: int, size: int) -> list[range]:
    return [range(i, min(n, i + size)) for i in range(0, n, size)]


# ---------------------------------------------------------------------------------- the server
class Server:
    """`engine serve` on ``target``'s device and compute type; ``max_batch_size`` None keeps the
    server's default batcher; ``extra_args``: more `engine serve` flags."""

    def __init__(
        self,
        model_dir: Path,
        target: Target,
        *,
        max_batch_size: int | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        from harness.processes import create_key_cli, start_server

        self.workdir = Path(tempfile.mkdtemp(prefix="bench-suite-"))
        store = f"sqlite:///{self.workdir}/engine.db"
        self.key = create_key_cli(store, "bench")
        args = [
            "--model",
            str(model_dir),
            "--store",
            store,
            "--device",
            target.device,
            "--compute-type",
            target.compute_type,
            "--rate-limit-per-minute",
            "0",  # the load generator is one key sending thousands of requests
        ]
        if max_batch_size is not None:
            args += ["--max-batch-size", str(max_batch_size)]
        args += extra_args
        self.process = start_server(args, self.workdir / "server.log", timeout_s=600.0)
        self.url = self.process.url
        self.paused = False

    def run(
        self, prompts: Sequence[Prompt], params: dict[str, Any], requests: int, concurrency: int
    ) -> CellResult:
        return asyncio.run(self._run(prompts, params, requests, concurrency))

    async def _run(
        self, prompts: Sequence[Prompt], params: dict[str, Any], requests: int, concurrency: int
    ) -> CellResult:
        from benchmarks.loadgen import Outcome, closed_loop, raw_submit_and_poll

        used = prompts[: min(len(prompts), requests)]
        # One keep-alive pool per prompt (loadgen sends one body per pool); connections open lazily.
        pools = [
            raw_submit_and_poll(
                self.url, self.key, {"prompt": p.text, "params": params}, concurrency=concurrency
            )
            for p in used
        ]

        async def one(i: int) -> Outcome:
            return await pools[i % len(pools)][0](i)

        try:
            outcomes = await closed_loop(one, concurrency=concurrency, total=requests)
        finally:
            for _, close in pools:
                await close()
        duration = max(o.end for o in outcomes) - min(o.start for o in outcomes)
        failures = [f"{o.status}: {o.error}" for o in outcomes if not o.ok]
        ok = [o for o in outcomes if o.ok]
        tokens, missing = await self._count_tokens([o.job_id for o in ok if o.job_id])
        return CellResult(tuple(o.latency_s for o in ok), duration, tokens, tuple(failures + missing))

    async def _count_tokens(self, job_ids: list[str]) -> tuple[int, list[str]]:
        """The completion tokens each finished job's usage reports (read after the timing)."""
        import httpx

        total, problems = 0, []
        async with httpx.AsyncClient(base_url=self.url, timeout=60.0) as client:
            for job_id in job_ids:
                r = await client.get(f"/v1/response/{job_id}", headers={"apiKey": self.key})
                usage = r.json().get("data", {}).get("usage") if r.status_code == 200 else None
                if usage is None:
                    problems.append(f"{job_id}: no usage in its answer (HTTP {r.status_code})")
                else:
                    total += int(usage["completion_tokens"])
        return total, problems

    def pause(self) -> None:
        """SIGSTOP: an idle `engine serve` still spends CPU (its loops poll), which would be taken
        from whichever contender is being timed; a stopped one spends none."""
        if self.process.proc.poll() is None and not self.paused:
            os.kill(self.process.proc.pid, signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        if self.paused:
            os.kill(self.process.proc.pid, signal.SIGCONT)
            self.paused = False

    def log_tail(self, chars: int = 3000) -> str:
        return self.process.log()[-chars:]

    def stop(self, keep_log: Path | None = None) -> int:
        """Stop the server, copy its log to ``keep_log`` and remove its temporary store."""
        self.resume()  # a stopped process would not act on SIGTERM
        code = self.process.stop()
        if keep_log is not None:
            keep_log.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.process.log_path, keep_log)
        shutil.rmtree(self.workdir, ignore_errors=True)
        return code


# ---------------------------------------------------------------------------------- engine-only
class EngineOnly:
    def __init__(self, model_dir: Path, target: Target) -> None:
        from engine.runtime.engine import Engine

        self.engine = Engine(model_dir, device=target.device, compute_type=target.compute_type)

    def run(
        self, prompts: Sequence[Prompt], params: dict[str, Any], requests: int, concurrency: int
    ) -> CellResult:
        from engine.runtime.params import DecodingParams
        from engine.runtime.result import GenerationRequest

        decoding = DecodingParams.from_dict(params)
        latencies: list[float] = []
        tokens = 0
        start = time.perf_counter()
        for chunk in _chunks(requests, concurrency):
            batch = [GenerationRequest(prompts[i % len(prompts)].ids, decoding) for i in chunk]
            t0 = time.perf_counter()
            results = self.engine.generate_requests(batch)
            latencies += [time.perf_counter() - t0] * len(batch)
            tokens += sum(len(r.token_ids) for r in results)
        return CellResult(tuple(latencies), time.perf_counter() - start, tokens, ())


# ---------------------------------------------------------------------------------- CTranslate2
class Ct2Direct:
    def __init__(self, model_dir: Path, target: Target) -> None:
        import ctranslate2

        from engine.runtime.ct2 import load_vocabulary

        self.vocab = load_vocabulary(model_dir)
        self.translator = ctranslate2.Translator(
            str(model_dir), device=target.device, compute_type=target.compute_type
        )

    def run(
        self, prompts: Sequence[Prompt], params: dict[str, Any], requests: int, concurrency: int
    ) -> CellResult:
        from engine.runtime.ct2 import DecodeOptions
        from engine.runtime.params import DecodingParams

        kwargs = DecodeOptions.from_params(DecodingParams.from_dict(params)).kwargs()
        sources = [[self.vocab[i] for i in p.ids] for p in prompts]
        latencies: list[float] = []
        tokens = 0
        start = time.perf_counter()
        for chunk in _chunks(requests, concurrency):
            t0 = time.perf_counter()
            out = self.translator.translate_batch([sources[i % len(sources)] for i in chunk], **kwargs)
            latencies += [time.perf_counter() - t0] * len(chunk)
            for r in out:
                hyp = r.hypotheses[0]
                tokens += len(hyp) - (1 if hyp and hyp[-1] == "</s>" else 0)
        return CellResult(tuple(latencies), time.perf_counter() - start, tokens, ())


# ---------------------------------------------------------------------------------- timers
class _Timer:
    """A generate loop in another Python, kept alive so that its runs interleave with ours: JSON
    lines over stdin/stdout (benchmarks/hf_timer.py and onnx_timer.py; their docstrings give the
    protocol). The first line it writes describes it (``info``)."""

    def __init__(self, command: Sequence[str], name: str) -> None:
        self.name = name
        self.proc = subprocess.Popen(list(command), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self._read()
        self.threads: int | None = self.info.get("threads")

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.name} timer exited; see its stderr above")
        out: dict[str, Any] = json.loads(line)
        if "error" in out:
            raise RuntimeError(f"the {self.name} timer: {out['error']}")
        return out

    def call(
        self, batch: Sequence[Sequence[int]], params: dict[str, Any], threads: int | None = None
    ) -> tuple[float, list[int]]:
        """Seconds for one generate call on ``batch`` and each row's new-token count."""
        assert self.proc.stdin is not None
        request: dict[str, Any] = {"input_ids": [list(ids) for ids in batch], "params": params}
        if threads is not None:
            request["threads"] = threads
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        answer = self._read()
        return float(answer["seconds"]), [int(n) for n in answer["lengths"]]

    def time(self, batch: Sequence[Sequence[int]], params: dict[str, Any]) -> float:
        """Seconds for one call whose every row must get exactly max_new_tokens (forced lengths)."""
        seconds, lengths = self.call(batch, params, self.threads)
        if any(n != params["max_new_tokens"] for n in lengths):
            raise RuntimeError(
                f"the {self.name} timer generated {lengths} tokens, not {params['max_new_tokens']}"
            )
        return seconds

    def run(
        self, prompts: Sequence[Prompt], params: dict[str, Any], requests: int, concurrency: int
    ) -> CellResult:
        """The suite's cell: one request at a time (that is how these baselines serve)."""
        del concurrency
        latencies: list[float] = []
        tokens = 0
        start = time.perf_counter()
        for i in range(requests):
            seconds, lengths = self.call([prompts[i % len(prompts)].ids], params, self.threads)
            latencies.append(seconds)
            tokens += lengths[0]
        return CellResult(tuple(latencies), time.perf_counter() - start, tokens, ())

    def stop(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    close = stop


class TransformersTimer(_Timer):
    """Transformers 4.55.x (.venv-ref) generate(): float32 on CPU unless told otherwise."""

    def __init__(
        self,
        hf_dir: Path,
        threads: int | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        python: Path = REF_PYTHON,
    ) -> None:
        if not python.is_file():
            raise RuntimeError(f"{python} is missing: run `make ref` for the Transformers baseline")
        args = [str(python), str(HF_TIMER), str(hf_dir)]
        if threads is not None or device != "cpu" or dtype != "float32":
            args += [str(threads if threads is not None else cores()), device, dtype]
        super().__init__(args, "Transformers")
        self.thread_trials: dict[int, float] = {}

    def pick_threads(
        self, ids: Sequence[int], params: dict[str, Any], choices: Sequence[int], tries: int = 2
    ) -> int:
        """Keep the thread count that runs ``params`` fastest (best of ``tries`` each)."""
        for threads in dict.fromkeys(choices):
            self.thread_trials[threads] = min(self.call([ids], params, threads)[0] for _ in range(tries))
        self.threads = min(self.thread_trials, key=lambda t: self.thread_trials[t])
        return self.threads


class OnnxRuntimeTimer(_Timer):
    """ONNX Runtime int8 (.venv-onnx, `make onnx`): the same checkpoint exported with optimum and
    quantized dynamically, greedy in its own KV-cached loop (benchmarks/onnx_timer.py)."""

    def __init__(self, hf_dir: Path, threads: int, work_dir: Path, python: Path = ONNX_PYTHON) -> None:
        if not python.is_file():
            raise RuntimeError(f"{python} is missing: run `make onnx` for the ONNX Runtime peer")
        super().__init__(
            [str(python), str(ONNX_TIMER), str(hf_dir), str(work_dir), str(threads)], "ONNX Runtime"
        )

    def run(
        self, prompts: Sequence[Prompt], params: dict[str, Any], requests: int, concurrency: int
    ) -> CellResult:
        """The suite's cell: ``concurrency`` requests per call, as Ct2Direct and EngineOnly."""
        latencies: list[float] = []
        tokens = 0
        start = time.perf_counter()
        for chunk in _chunks(requests, concurrency):
            seconds, lengths = self.call([prompts[i % len(prompts)].ids for i in chunk], params)
            latencies += [seconds] * len(chunk)
            tokens += sum(lengths)
        return CellResult(tuple(latencies), time.perf_counter() - start, tokens, ())


# ---------------------------------------------------------------------------------- inputs
# FLAN-T5-small's shapes with random weights, int8 (and the float32 checkpoint it was converted
# from, for Transformers and ONNX Runtime): the model of the decoder benchmarks (bench_targets.py,
# bench_contrastive.py, bench_layers_call.py, bench_step_products.py, profile_step.py, ...).
SMALL_INT8 = OUT_DIR / "models" / "contrastive-small-int8"
SMALL_HF = OUT_DIR / "models" / "contrastive-small-hf"
FORCED_NEW_TOKENS = 64
FORCED = {"max_new_tokens": FORCED_NEW_TOKENS, "min_new_tokens": FORCED_NEW_TOKENS}
# Greedy and contrastive search (k 4, alpha 0.6, our users' default) with 64 new tokens forced.
FORCED_STRATEGIES: dict[str, dict[str, Any]] = {
    "greedy": FORCED,
    "contrastive": {"penalty_alpha": 0.6, "top_k": 4, **FORCED},
}


def small_models() -> tuple[Path, Path]:
    """(SMALL_INT8, SMALL_HF), built once (seed 0)."""
    if not (SMALL_INT8 / "engine.json").is_file() or not (SMALL_HF / "model.safetensors").is_file():
        from engine.model.demo import build_demo_model

        build_demo_model(
            SMALL_INT8, size="small", seed=0, quantization="int8", hf_output=SMALL_HF, force=True
        )
    return SMALL_INT8, SMALL_HF


def forced_prompts(batch: int, tokens: int) -> list[list[int]]:
    """``batch`` prompts of ``tokens`` ids (EOS last), the same for a given batch size."""
    rng = np.random.default_rng(batch)
    return [[*(int(i) for i in rng.integers(3, 30000, size=tokens - 1)), 1] for _ in range(batch)]


def ct2_greedy(translator: Any, vocab: list[str], batch: list[list[int]], new_tokens: int) -> float:
    """Seconds for CTranslate2 greedy with exactly ``new_tokens`` tokens per row."""
    source = [[vocab[i] for i in ids] for ids in batch]
    start = time.perf_counter()
    out = translator.translate_batch(
        source, beam_size=1, max_decoding_length=new_tokens, min_decoding_length=new_tokens
    )
    seconds = time.perf_counter() - start
    if not all(len(r.hypotheses[0]) == new_tokens for r in out):
        raise RuntimeError("CTranslate2 did not generate the forced number of tokens")
    return seconds
