"""What a benchmark run measures: targets, model shapes, strategies, concurrency, and the baselines.

A ``Plan`` is built once from a preset and the command line's overrides; every name is checked
here, so a typo fails before any model is built. Targets the machine lacks (CUDA ones without a
GPU) are kept in the plan as ``Skipped`` entries with the reason, so the report says what was not
measured instead of leaving it out silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from engine.errors import InvalidRequest

SHAPES: tuple[str, ...] = ("small", "base", "large")
# "tiny" is the tests' shape (d_model 64, 2 layers): only for smoke runs of the suite itself.
SMOKE_SHAPE = "tiny"


class Kind(Enum):
    """Who handles the requests of a measurement."""

    SERVER = "server"  # `engine serve` over REST, the dynamic batcher at its defaults
    SERVER_B1 = "server b1"  # the same server at --max-batch-size 1: what batching buys
    ENGINE = "engine-only"  # Engine.generate_requests in this process, c requests per call
    CT2 = "ctranslate2"  # ctranslate2.Translator.translate_batch, no engine code at all
    HF = "transformers"  # Transformers' generate() in .venv-ref, one request at a time
    # ONNX Runtime int8 (optimum export, dynamic quantization) in .venv-onnx, its own KV-cached
    # greedy loop, c requests per call: the peer CPU users pick for fast T5.
    ONNX = "onnxruntime int8"

    @property
    def is_baseline(self) -> bool:
        return self in (Kind.SERVER_B1, Kind.CT2, Kind.HF, Kind.ONNX)


# The baselines' names on the command line (--baselines).
BASELINES: dict[str, Kind] = {
    "server-b1": Kind.SERVER_B1,
    "ctranslate2": Kind.CT2,
    "transformers": Kind.HF,
    "onnxruntime": Kind.ONNX,
}
# What the ONNX Runtime peer runs (its loop is greedy only).
ONNX_STRATEGIES = ("greedy",)


@dataclass(frozen=True)
class Target:
    name: str
    device: str  # "cpu" | "cuda"
    compute_type: str  # CTranslate2 compute type
    model_quantization: str  # which converted folder the target loads

    @property
    def is_cuda(self) -> bool:
        return self.device == "cuda"


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("cpu-int8", "cpu", "int8", "int8"),
        Target("cpu-float32", "cpu", "float32", "float32"),
        # float16/bfloat16 load the float32 folder: converting at load time keeps full-precision
        # weights as the source instead of re-rounding int8 ones.
        Target("cuda-float16", "cuda", "float16", "float32"),
        Target("cuda-bfloat16", "cuda", "bfloat16", "float32"),
        Target("cuda-int8_float16", "cuda", "int8_float16", "int8"),
    )
}


@dataclass(frozen=True)
class Strategy:
    name: str
    params: tuple[tuple[str, Any], ...]  # decoding params besides the token counts
    on_ctranslate2: bool  # contrastive search runs on our own decoder, not on CTranslate2

    def request_params(self, new_tokens: int) -> dict[str, Any]:
        """The request's ``params``: every run forces exactly ``new_tokens`` so runs compare."""
        return {**dict(self.params), "max_new_tokens": new_tokens, "min_new_tokens": new_tokens}


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("greedy", (), True),
        Strategy("contrastive", (("penalty_alpha", 0.6), ("top_k", 4)), False),
        Strategy("beam4", (("num_beams", 4),), True),
    )
}


@dataclass(frozen=True)
class Preset:
    name: str
    shapes: tuple[str, ...]
    strategies: tuple[str, ...]
    concurrency: tuple[int, ...]
    requests: int  # per cell and round: the same count at every concurrency
    rounds: int
    engine_concurrency: tuple[int, ...] | None  # None: every concurrency of the plan
    b1_concurrency: tuple[int, ...] | None
    hf_strategies: tuple[str, ...]


PRESETS: dict[str, Preset] = {
    # What a CI-size machine (2 cores) runs in about half an hour.
    "quick": Preset(
        name="quick",
        shapes=("small",),
        strategies=("greedy", "contrastive", "beam4"),
        concurrency=(1, 4, 16),
        requests=16,
        rounds=2,
        engine_concurrency=(1, 16),
        b1_concurrency=(16,),
        hf_strategies=("greedy", "contrastive"),
    ),
    # The whole matrix: hours on 2 cores, minutes on a GPU.
    "full": Preset(
        name="full",
        shapes=SHAPES,
        strategies=tuple(STRATEGIES),
        concurrency=(1, 4, 16, 64),
        requests=64,
        rounds=3,
        engine_concurrency=None,
        b1_concurrency=None,
        hf_strategies=tuple(STRATEGIES),
    ),
}


@dataclass(frozen=True)
class Skipped:
    what: str
    reason: str


@dataclass(frozen=True)
class Job:
    """One thing timed in a round: who (kind, target) handles which cell."""

    kind: Kind
    target: Target | None  # None for Transformers and ONNX Runtime (their own models, on CPU)
    shape: str
    strategy: Strategy
    concurrency: int

    @property
    def contender(self) -> str:
        return self.kind.value if self.target is None else f"{self.kind.value} {self.target.name}"

    @property
    def key(self) -> str:
        """A file-name-safe id, unique within a run (round aside)."""
        who = self.contender.replace(" ", "-")
        return f"{self.shape}-{self.strategy.name}-{who}-c{self.concurrency}"


@dataclass(frozen=True)
class Plan:
    preset: str
    shapes: tuple[str, ...]
    strategies: tuple[Strategy, ...]
    concurrency: tuple[int, ...]
    targets: tuple[Target, ...]
    requests: int
    rounds: int
    engine_concurrency: tuple[int, ...]
    b1_concurrency: tuple[int, ...]
    hf_strategies: tuple[Strategy, ...]
    baselines: frozenset[Kind]
    new_tokens: int = 64
    prompt_tokens: int = 100
    skipped: tuple[Skipped, ...] = field(default=())

    @property
    def b1_target(self) -> Target:
        """The baseline server runs the first target only: it answers "what does batching buy"."""
        return self.targets[0]

    def jobs(self, shape: str) -> list[Job]:
        """Everything one round times for ``shape``, in a fixed order (the runner rotates it)."""
        out: list[Job] = []
        for strategy in self.strategies:
            for c in self.concurrency:
                for target in self.targets:
                    out.append(Job(Kind.SERVER, target, shape, strategy, c))
                    if c in self.engine_concurrency:
                        out.append(Job(Kind.ENGINE, target, shape, strategy, c))
                    if Kind.CT2 in self.baselines and strategy.on_ctranslate2:
                        out.append(Job(Kind.CT2, target, shape, strategy, c))
                if Kind.SERVER_B1 in self.baselines and c in self.b1_concurrency:
                    out.append(Job(Kind.SERVER_B1, self.b1_target, shape, strategy, c))
                onnx = Kind.ONNX in self.baselines and strategy.name in ONNX_STRATEGIES
                if onnx and c in self.engine_concurrency:
                    out.append(Job(Kind.ONNX, None, shape, strategy, c))
            if Kind.HF in self.baselines and strategy in self.hf_strategies:
                out.append(Job(Kind.HF, None, shape, strategy, 1))
        return out


def _pick(kind: str, names: Sequence[str], known: Sequence[str]) -> tuple[str, ...]:
    unknown = [n for n in names if n not in known]
    if unknown:
        raise InvalidRequest(
            f"unknown {kind} {', '.join(map(repr, unknown))}; choose from {', '.join(known)}"
        )
    if not names:
        raise InvalidRequest(f"at least one {kind} is needed")
    return tuple(dict.fromkeys(names))  # de-duplicated, order kept


def build_plan(
    preset: str = "quick",
    *,
    cuda_devices: int,
    shapes: Sequence[str] | None = None,
    strategies: Sequence[str] | None = None,
    concurrency: Sequence[int] | None = None,
    targets: Sequence[str] | None = None,
    requests: int | None = None,
    rounds: int | None = None,
    new_tokens: int = 64,
    prompt_tokens: int = 100,
    baselines: Sequence[str] | None = None,
    hf_available: bool = True,
    onnx_available: bool = True,
) -> Plan:
    """The plan for ``preset`` with the given overrides. ``cuda_devices`` is what CTranslate2 sees
    (``ctranslate2.get_cuda_device_count()``); CUDA targets are skipped, with a note, when it is 0."""
    if preset not in PRESETS:
        raise InvalidRequest(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    p = PRESETS[preset]
    shape_names = _pick("shape", shapes if shapes is not None else p.shapes, (*SHAPES, SMOKE_SHAPE))
    strategy_names = _pick(
        "strategy", strategies if strategies is not None else p.strategies, tuple(STRATEGIES)
    )
    asked_targets = _pick("target", targets if targets is not None else tuple(TARGETS), tuple(TARGETS))
    levels = tuple(sorted(set(concurrency if concurrency is not None else p.concurrency)))
    if not levels or levels[0] < 1:
        raise InvalidRequest(f"concurrency levels must be at least 1, got {list(concurrency or [])}")
    n_requests = p.requests if requests is None else requests
    n_rounds = p.rounds if rounds is None else rounds
    for name, value in (("requests", n_requests), ("rounds", n_rounds), ("new tokens", new_tokens)):
        if value < 1:
            raise InvalidRequest(f"{name} must be at least 1, got {value}")
    if prompt_tokens < 2:
        raise InvalidRequest(f"prompt tokens must be at least 2, got {prompt_tokens}")

    skipped: list[Skipped] = []
    runnable: list[Target] = []
    for name in asked_targets:
        target = TARGETS[name]
        if target.is_cuda and cuda_devices < 1:
            skipped.append(Skipped(name, "no CUDA device (ctranslate2.get_cuda_device_count() is 0)"))
        else:
            runnable.append(target)
    if not runnable:
        raise InvalidRequest(
            f"none of the targets {', '.join(asked_targets)} can run here: "
            + "; ".join(f"{s.what}: {s.reason}" for s in skipped)
        )

    base_names = (
        tuple(BASELINES)
        if baselines is None
        else (_pick("baseline", baselines, tuple(BASELINES)) if baselines else ())
    )
    chosen = {BASELINES[n] for n in base_names}
    if Kind.HF in chosen and not hf_available:
        chosen.discard(Kind.HF)
        skipped.append(Skipped("transformers baseline", "no .venv-ref (run `make ref`)"))
    if Kind.ONNX in chosen and not onnx_available:
        chosen.discard(Kind.ONNX)
        skipped.append(Skipped("onnxruntime baseline", "no .venv-onnx (run `make onnx`)"))

    def within(levels_of_preset: tuple[int, ...] | None) -> tuple[int, ...]:
        if levels_of_preset is None:
            return levels
        picked = tuple(c for c in levels if c in levels_of_preset)
        return picked or (levels[-1],)  # overrides left none of the preset's: keep the highest

    strategy_objs = tuple(STRATEGIES[n] for n in strategy_names)
    return Plan(
        preset=preset,
        shapes=shape_names,
        strategies=strategy_objs,
        concurrency=levels,
        targets=tuple(runnable),
        requests=n_requests,
        rounds=n_rounds,
        engine_concurrency=within(p.engine_concurrency),
        b1_concurrency=within(p.b1_concurrency),
        hf_strategies=tuple(s for s in strategy_objs if s.name in p.hf_strategies),
        baselines=frozenset(chosen),
        new_tokens=new_tokens,
        prompt_tokens=prompt_tokens,
        skipped=tuple(skipped),
    )
