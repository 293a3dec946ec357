"""The CTranslate2 ``Translator``: token ids in, token ids out, Hugging Face ``generate`` semantics.

CTranslate2 speaks token strings, so this module owns the model's vocabulary and converts at its
edge. Greedy and sampling read the generated ids from the per-step callback (exact ids, even where
a padded vocabulary repeats a string); beam search cannot take a callback and maps strings back.

What maps one to one (checked against Transformers by tests/test_engine_reference.py):
greedy, beam search (``num_beams``, ``length_penalty``), ``min_new_tokens`` -> ``min_decoding_length``,
``max_new_tokens`` -> ``max_decoding_length`` (both count the EOS, as in Transformers), and in greedy
``repetition_penalty`` and ``no_repeat_ngram_size``. Where the two differ, and what is done:
- CTranslate2 leaves the decoder-start token out of the history that ``repetition_penalty`` and
  ``no_repeat_ngram_size`` look at; Transformers keeps it in. The outputs differ only once the
  model emits the decoder-start id itself (pad, 0), which trained T5 checkpoints do not do; in
  float32 such greedy requests run on our own exact decoder instead (backends.py).
- In beam search CTranslate2 applies those processors (and ``min_new_tokens``) to the logits before
  its log-softmax, Transformers to the log-probabilities after it, so beam scores differ once a
  processor removes or scales a token. Beam search with processors is therefore close to, not
  always identical to, Transformers; without processors it is identical.
- Sampling draws from CTranslate2's own generator, which it seeds once per worker thread: an
  unseeded draw. A request with a ``seed`` runs on our own decoder instead, with a generator of its
  own (``backends.needs_decoder``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ctranslate2

from engine.errors import InvalidRequest, ModelError
from engine.runtime.params import DecodingParams

log = logging.getLogger(__name__)

VOCABULARY_FILES = (
    "shared_vocabulary.json",
    "shared_vocabulary.txt",
    "target_vocabulary.json",
    "target_vocabulary.txt",
)
DEVICES = ("cpu", "cuda", "auto")

# (row in the batch, generated token id) -> True to stop that row. EOS is reported too.
StepCallback = Callable[[int, int], bool]


def resolve_device(device: str) -> str:
    """``auto`` is cuda when CTranslate2 sees a GPU, else cpu; ``cuda`` without one is an error."""
    if device not in DEVICES:
        raise InvalidRequest(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cpu":
        return device
    gpus = ctranslate2.get_cuda_device_count()
    if device == "auto":
        return "cuda" if gpus > 0 else "cpu"
    if gpus == 0:
        raise InvalidRequest(
            "device cuda was requested but ctranslate2.get_cuda_device_count() is 0: this "
            "CTranslate2 build sees no usable CUDA GPU (no GPU, no driver, or no libcublas.so.12; "
            "see docs/gpu.md). Use --device cpu or --device auto"
        )
    return device


def resolve_compute_type(device: str, compute_type: str | None) -> str:
    """Default int8 on CPU and float16 on CUDA; anything else must be offered by this device."""
    supported = sorted(ctranslate2.get_supported_compute_types(device))
    if compute_type is None:
        compute_type = "int8" if device == "cpu" else "float16"
    if compute_type not in supported:
        raise InvalidRequest(
            f"compute type {compute_type!r} is not supported on {device} by this machine; "
            f"supported: {', '.join(supported)}"
        )
    return compute_type


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def thread_layout(inter_threads: int, intra_threads: int, device: str = "cpu") -> tuple[int, int]:
    """(workers, OpenMP threads per worker). On CPU, ``intra_threads`` 0 (automatic) means one
    single-threaded worker per core, and ``translate`` splits a batch across the workers. On CUDA
    a worker is a model replica on the GPU and the batch should stay whole: ``inter_threads``
    workers (1 by default) of one host thread each.

    Measured on 2 cores (benchmarks/RESULTS.md, "Greedy decoding"): a decoder step's products have
    a handful of rows, which two OpenMP threads share badly (their barriers cost more than the
    second core gives); two workers of one thread, each decoding half the batch, were 1.3x to 1.8x
    faster at batch 2 to 32 and as fast at batch 1. CTranslate2 shares the weights between CPU
    workers, so this costs no second copy of the model.
    """
    if intra_threads == 0:
        return (inter_threads if device == "cuda" else max(inter_threads, cpu_count())), 1
    return inter_threads, intra_threads


@dataclass(frozen=True)
class DecodeOptions:
    """The options of one ``translate_batch`` call; built from DecodingParams by ``from_params``."""

    max_decoding_length: int
    min_decoding_length: int = 0
    beam_size: int = 1
    length_penalty: float = 1.0
    sampling_topk: int = 1
    sampling_topp: float = 1.0
    sampling_temperature: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0

    @classmethod
    def from_params(cls, params: DecodingParams, max_new_tokens: int | None = None) -> DecodeOptions:
        """``max_new_tokens`` overrides the params' own limit (a batch decodes to its largest)."""
        common: dict[str, Any] = {
            "max_decoding_length": params.max_new_tokens if max_new_tokens is None else max_new_tokens,
            "min_decoding_length": params.min_new_tokens,
            "repetition_penalty": params.repetition_penalty,
            "no_repeat_ngram_size": params.no_repeat_ngram_size,
        }
        spec = params.spec  # its row says how CTranslate2 runs it, if it does
        if spec.ct2_options is None:
            raise InvalidRequest(f"{spec.strategy.value} decoding does not run on CTranslate2")
        return cls(**common, **spec.ct2_options(params))

    def kwargs(self) -> dict[str, Any]:
        return {
            "beam_size": self.beam_size,
            # Transformers stops a beam search once num_beams hypotheses are finished (early_stopping
            # False with its heuristic); CTranslate2's patience 1 collects exactly beam_size of them.
            "patience": 1.0,
            "num_hypotheses": 1,
            "length_penalty": self.length_penalty,
            "repetition_penalty": self.repetition_penalty,
            "no_repeat_ngram_size": self.no_repeat_ngram_size,
            "min_decoding_length": self.min_decoding_length,
            "max_decoding_length": self.max_decoding_length,
            "sampling_topk": self.sampling_topk,
            "sampling_topp": self.sampling_topp,
            "sampling_temperature": self.sampling_temperature,
            # Our own limit is enforced before this call; CTranslate2 would truncate silently.
            "max_input_length": 0,
            # The EOS tells EOS from LENGTH apart; it is stripped from the ids afterwards.
            "return_end_token": True,
            # Scores cost a log-softmax over the vocabulary per step and nobody reads them.
            "return_scores": False,
            "replace_unknowns": False,
        }


@dataclass(frozen=True)
class Hypothesis:
    """One row's output. ``token_ids`` excludes the decoder-start token and the EOS."""

    token_ids: tuple[int, ...]
    ended_with_eos: bool


class CT2Translator:
    """A loaded ``ctranslate2.Translator`` with its vocabulary. Thread-safe, as the Translator is."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        device: str = "cpu",
        compute_type: str | None = None,
        inter_threads: int = 1,
        intra_threads: int = 0,
        eos_id: int = 1,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.device = resolve_device(device)
        self.compute_type = resolve_compute_type(self.device, compute_type)
        if inter_threads < 1 or intra_threads < 0:
            raise InvalidRequest(
                f"inter_threads must be >= 1 and intra_threads >= 0, got {inter_threads} and {intra_threads}"
            )
        self.inter_threads, self.intra_threads = thread_layout(inter_threads, intra_threads, self.device)
        self.eos_id = eos_id
        self.vocabulary = load_vocabulary(self.model_dir)
        self._token_to_id: dict[str, int] = {}
        for i, token in enumerate(self.vocabulary):
            self._token_to_id.setdefault(token, i)
        self._translator = self._load()

    def _load(self) -> ctranslate2.Translator:
        if not ctranslate2.contains_model(str(self.model_dir)):
            raise ModelError(
                f"{self.model_dir} holds no CTranslate2 model (model.bin); re-run `engine convert`"
            )
        try:
            return ctranslate2.Translator(
                str(self.model_dir),
                device=self.device,
                compute_type=self.compute_type,
                inter_threads=self.inter_threads,
                intra_threads=self.intra_threads,
            )
        except (RuntimeError, ValueError, OSError) as exc:
            raise ModelError(f"CTranslate2 cannot load {self.model_dir}: {exc}") from exc

    @property
    def vocab_size(self) -> int:
        return len(self.vocabulary)

    def tokens(self, ids: Sequence[int]) -> list[str]:
        try:
            return [self.vocabulary[i] for i in ids]
        except IndexError:
            bad = [i for i in ids if not 0 <= i < len(self.vocabulary)]
            raise InvalidRequest(
                f"input id(s) {bad[:5]} outside the model's vocabulary of {len(self.vocabulary)}"
            ) from None

    def translate(
        self,
        batch: Sequence[Sequence[int]],
        options: DecodeOptions,
        *,
        on_step: StepCallback | None = None,
    ) -> list[Hypothesis]:
        """Decode a batch (source ids, EOS included) in one call."""
        source = [self.tokens(ids) for ids in batch]
        if options.beam_size > 1:
            if on_step is not None:
                raise InvalidRequest("token streaming is not available for beam search")
            return self._run(source, options, None)
        return self._run(source, options, on_step)

    def _run(
        self, source: list[list[str]], options: DecodeOptions, on_step: StepCallback | None
    ) -> list[Hypothesis]:
        kwargs = options.kwargs()
        if self.inter_threads > 1 and len(source) > 1:
            # One sub-batch per worker, run in parallel; CTranslate2 groups rows of similar length,
            # returns results in input order and reports callback rows by their index in ``source``.
            kwargs["max_batch_size"] = -(-len(source) // self.inter_threads)
            kwargs["batch_type"] = "examples"
        if options.beam_size > 1:
            results = self._call(source, kwargs)
            return [self._from_tokens(r.hypotheses[0]) for r in results]

        # Greedy and sampling: the callback sees every id (EOS included), in order, per row.
        rows: list[list[int]] = [[] for _ in source]
        errors: list[BaseException] = []
        eos_id = self.eos_id

        def callback(step: ctranslate2.GenerationStepResult) -> bool:
            row = step.batch_id
            rows[row].append(step.token_id)
            if on_step is None or errors:
                return bool(errors)
            try:
                return bool(on_step(row, step.token_id))
            except BaseException as exc:  # re-raised below, outside CTranslate2's thread
                errors.append(exc)
                return True

        # CTranslate2 may drop its reference to the callback on its worker thread after the call
        # returns. Were that the last reference to something that owns a Translator, the
        # Translator would be destroyed on its own worker thread, which aborts the process
        # ("Resource deadlock avoided"); so it only ever holds this empty-able trampoline.
        holder = [callback]

        def trampoline(step: ctranslate2.GenerationStepResult) -> bool:
            return holder[0](step) if holder else True

        try:
            self._call(source, {**kwargs, "callback": trampoline})
        finally:
            holder.clear()
        if errors:
            error = errors.pop()
            try:
                raise error
            finally:
                del error
        out = []
        for ids in rows:
            eos = bool(ids) and ids[-1] == eos_id
            out.append(Hypothesis(tuple(ids[:-1] if eos else ids), ended_with_eos=eos))
        return out

    def _call(self, source: list[list[str]], kwargs: dict[str, Any]) -> Any:
        try:
            return self._translator.translate_batch(source, **kwargs)
        except (RuntimeError, ValueError) as exc:
            raise ModelError(f"CTranslate2 failed: {exc}") from exc

    def _from_tokens(self, tokens: Sequence[str]) -> Hypothesis:
        # Strings that a padded vocabulary repeats map to their first id; only unused padding rows
        # of T5's vocabulary repeat, and beam search is the one path without exact ids.
        ids = [self._token_to_id[t] for t in tokens]
        eos = bool(ids) and ids[-1] == self.eos_id
        return Hypothesis(tuple(ids[:-1] if eos else ids), ended_with_eos=eos)


def load_vocabulary(model_dir: Path) -> list[str]:
    for name in VOCABULARY_FILES:
        path = model_dir / name
        if not path.is_file():
            continue
        try:
            if name.endswith(".json"):
                tokens = json.loads(path.read_text(encoding="utf-8"))
            else:
                tokens = path.read_text(encoding="utf-8").split("\n")
                if tokens and tokens[-1] == "":
                    tokens.pop()
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelError(f"cannot read {path}: {exc}; re-run `engine convert`") from exc
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise ModelError(f"{path} must hold a list of token strings; re-run `engine convert`")
        return tokens
    raise ModelError(
        f"{model_dir} has no CTranslate2 vocabulary ({' or '.join(VOCABULARY_FILES[:2])}); "
        "re-run `engine convert`"
    )
