"""``Engine``: the Python API (``from engine import Engine``) and the runtime behind the server.

It loads a model folder (engine.json, spiece.model, the CTranslate2 model), tokenizes, groups
requests that can share one decoder call, and turns each backend's output into typed ``Result``s.
backends.py picks the backend of a group: CTranslate2 (greedy, beam search, unseeded sampling) or
our own KV-cached decoder (engine/runtime/t5.py + decoder_batch.py: contrastive search, seeded
sampling, greedy where it is exact or faster), which is loaded on first use.

Batching: requests with equal ``DecodingParams.batch_key()`` share one ``translate_batch`` call,
decoded up to the group's largest ``max_new_tokens``; a request that asked fewer tokens is stopped
at its own limit by the step callback. That is exact for greedy (a greedy prefix does not depend on
how long decoding goes on) and for unseeded sampling (a prefix of a longer draw is a draw of the
shorter length). Beam search is not: the limit changes which hypotheses finish, so beam requests
are split further by ``max_new_tokens``. A seeded sampling request draws from a generator of its
own on our decoder (continuous batching, rows independent of each other), so that its output
depends on its prompt and parameters only, never on what it was batched with.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.errors import InvalidRequest, ModelError, PromptTooLong
from engine.limits import DEFAULT_MAX_NEW_TOKENS_LIMIT
from engine.model.manifest import TOKENIZER_NAME, Manifest
from engine.model.tokenizer import Tokenizer
from engine.runtime.backends import Backend, backend_for, greedy_continuous, needs_decoder
from engine.runtime.ct2 import CT2Translator, DecodeOptions, Hypothesis, StepCallback
from engine.runtime.params import DecodingParams
from engine.runtime.protocols import OnToken
from engine.runtime.result import FinishReason, GenerationRequest, Result, Usage
from engine.runtime.stop import StopCut, stop_sequences

if TYPE_CHECKING:
    from engine.config import Config
    from engine.runtime.decoder_batch import DecoderBatch
    from engine.runtime.t5 import T5Runtime

log = logging.getLogger(__name__)


class Engine:
    """A loaded model. Thread-safe: calls from several threads queue on CTranslate2's workers."""

    def __init__(
        self,
        model_dir: str | Path,
        device: str = "cpu",
        compute_type: str | None = None,
        *,
        inter_threads: int = 1,
        intra_threads: int = 0,
        max_new_tokens_limit: int = DEFAULT_MAX_NEW_TOKENS_LIMIT,
        cuda_graphs: bool = False,
    ) -> None:
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise ModelError(
                f"model folder {self.model_dir} does not exist. Make one with "
                "`engine convert SOURCE --output DIR` or `engine demo-model --output DIR`"
            )
        self.manifest = Manifest.load(self.model_dir)
        self.tokenizer = Tokenizer(
            self.model_dir / TOKENIZER_NAME,
            eos_id=self.manifest.eos_token_id,
            pad_id=self.manifest.pad_token_id,
        )
        self.translator = CT2Translator(
            self.model_dir,
            device=device,
            compute_type=compute_type,
            inter_threads=inter_threads,
            intra_threads=intra_threads,
            eos_id=self.manifest.eos_token_id,
        )
        if self.translator.vocab_size != self.manifest.vocab_size:
            raise ModelError(
                f"{self.model_dir}: the CTranslate2 vocabulary has {self.translator.vocab_size} "
                f"tokens but engine.json says {self.manifest.vocab_size}; re-run `engine convert`"
            )
        if self.tokenizer.sp_vocab_size > self.manifest.vocab_size:
            raise ModelError(
                f"{self.model_dir}: spiece.model has {self.tokenizer.sp_vocab_size} pieces, more "
                f"than the model's vocabulary of {self.manifest.vocab_size}; re-run `engine convert`"
            )
        self.max_new_tokens_limit = max_new_tokens_limit
        self.cuda_graphs = cuda_graphs  # see Config.cuda_graphs
        self.intra_threads = intra_threads
        self._decoder_runtime: T5Runtime | None = None
        self._decoder_lock = threading.Lock()
        if self.manifest.random_weights:
            log.warning(
                "%s has RANDOM WEIGHTS (a demo model): its outputs are not meaningful text", model_dir
            )

    @classmethod
    def from_config(cls, cfg: Config) -> Engine:
        if cfg.model_dir is None:
            raise InvalidRequest("no model folder given: pass --model DIR (or set ENGINE_MODEL_DIR)")
        if not cfg.qlinear:
            from engine.runtime import qlinear

            qlinear.use_kernel(False)  # process-wide, before any runtime loads
        return cls(
            cfg.model_dir,
            cfg.device,
            cfg.compute_type,
            inter_threads=cfg.inter_threads,
            intra_threads=cfg.intra_threads,
            max_new_tokens_limit=cfg.max_new_tokens_limit,
            cuda_graphs=cfg.cuda_graphs,
        )

    @property
    def device(self) -> str:
        return self.translator.device

    @property
    def compute_type(self) -> str:
        return self.translator.compute_type

    # -- the Python API --------------------------------------------------------------------------

    def generate(self, prompts: Sequence[str], **params: Any) -> list[Result]:
        """One ``Result`` per prompt. ``params`` are the request's decoding parameters (docs/api.md)."""
        if isinstance(prompts, str):
            raise InvalidRequest("prompts must be a list of strings, not a single string")
        decoding = DecodingParams.from_dict(params, max_new_tokens_limit=self.max_new_tokens_limit)
        requests = [GenerationRequest(ids, decoding, i) for i, ids in enumerate(self.tokenize(prompts))]
        return self.generate_requests(requests)

    def tokenize(self, prompts: Sequence[str]) -> list[tuple[int, ...]]:
        """Sentencepiece ids + EOS per prompt; a prompt over the model's limit is an error."""
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise InvalidRequest(f"prompt {i} must be a string, got {type(prompt).__name__}")
        encoded = [tuple(ids) for ids in self.tokenizer.encode_batch(list(prompts))]
        for i, ids in enumerate(encoded):
            self._check_length(i, ids)
        return encoded

    def _check_length(self, index: int, ids: Sequence[int]) -> None:
        limit = self.manifest.max_input_length
        if len(ids) > limit:
            raise PromptTooLong(
                f"prompt {index} is {len(ids)} tokens (EOS included), {len(ids) - limit} more than "
                f"the model's limit of {limit}; shorten it"
            )

    # -- EngineLike ------------------------------------------------------------------------------

    def generate_requests(
        self, requests: Sequence[GenerationRequest], on_token: OnToken | None = None
    ) -> list[Result]:
        """Decode requests of any mix of strategies; one CTranslate2 call per compatible group.

        ``on_token(index into requests, token id)`` is called for every generated token except the
        EOS, in order per request; returning True stops that request (finish reason CANCELLED).
        Beam search reports its tokens once the search is over (it cannot stream).
        """
        for i, request in enumerate(requests):
            self._check_length(i, request.input_ids)
        results: dict[int, Result] = {}
        for group in _groups(requests):
            params = requests[group[0]].params
            backend = backend_for(
                params, device=self.device, compute_type=self.compute_type, batch_size=len(group)
            )
            if backend is Backend.DECODER:
                results.update(self._run_decoder(requests, group, on_token))
            else:
                results.update(self._run_ct2(requests, group, on_token))
        return [results[i] for i in range(len(requests))]

    def greedy_continuous(self) -> bool:
        """Whether greedy is served on our decoder's continuous batch by default on this device and
        compute type (backends.GREEDY_CONTINUOUS, measured)."""
        return greedy_continuous(self.device, self.compute_type)

    def decoder_batch(self) -> DecoderBatch:
        """A continuous batch on our KV-cached decoder (every strategy but beam search)."""
        from engine.runtime.decoder_batch import DecoderBatch

        return DecoderBatch(self._decoder(), detokenize=self.tokenizer.decode)

    # -- CTranslate2 -----------------------------------------------------------------------------

    def _run_ct2(
        self, requests: Sequence[GenerationRequest], group: list[int], on_token: OnToken | None
    ) -> dict[int, Result]:
        params = [requests[i].params for i in group]
        limit = max(p.max_new_tokens for p in params)
        options = DecodeOptions.from_params(params[0], max_new_tokens=limit)
        batch = [requests[i].input_ids for i in group]
        cancelled = [False] * len(group)
        generated: list[list[int]] = [[] for _ in group]
        stops = [stop_sequences(p.stop, self.tokenizer.decode) for p in params]
        cuts: list[StopCut | None] = [None] * len(group)
        eos = self.manifest.eos_token_id

        def on_step(row: int, token_id: int) -> bool:
            if token_id == eos:
                return False
            ids = generated[row]
            ids.append(token_id)
            if on_token is not None and on_token(group[row], token_id):
                cancelled[row] = True
                return True
            stop = stops[row]
            if stop is not None:
                cuts[row] = stop.check(ids)
                if cuts[row] is not None:
                    return True  # CTranslate2 ends this row alone
            return len(ids) >= params[row].max_new_tokens

        uniform = all(p.max_new_tokens == limit for p in params)
        watched = on_token is not None or not uniform or any(stops)
        callback: StepCallback | None = on_step if options.beam_size == 1 and watched else None
        hyps = self.translator.translate(batch, options, on_step=callback)
        if options.beam_size > 1:
            # Beam search cannot stop early: its hypotheses are known once the search is over.
            for row, hyp in enumerate(hyps):
                stop = stops[row]
                cuts[row] = None if stop is None else stop.first(hyp.token_ids)
                cut = cuts[row]
                if cut is not None:
                    hyps[row] = replace(hyp, token_ids=hyp.token_ids[: cut.tokens], ended_with_eos=False)
            if on_token is not None:
                for row, hyp in enumerate(hyps):
                    for n, token_id in enumerate(hyp.token_ids, start=1):
                        if on_token(group[row], token_id):
                            cancelled[row] = True
                            cuts[row] = None
                            hyps[row] = replace(hyp, token_ids=hyp.token_ids[:n], ended_with_eos=False)
                            break
        return {
            index: self._result(requests[index], hyp, cancelled[row], cuts[row])
            for row, (index, hyp) in enumerate(zip(group, hyps, strict=True))
        }

    def _result(
        self, request: GenerationRequest, hyp: Hypothesis, cancelled: bool, cut: StopCut | None
    ) -> Result:
        ids = hyp.token_ids[: request.params.max_new_tokens]
        if cancelled:
            reason = FinishReason.CANCELLED
        elif cut is not None:
            reason = FinishReason.STOP
        elif hyp.ended_with_eos:
            reason = FinishReason.EOS
        else:
            reason = FinishReason.LENGTH
        return Result(
            text=self.tokenizer.decode(ids) if cut is None else cut.text,
            token_ids=ids,
            usage=Usage(prompt_tokens=len(request.input_ids), completion_tokens=len(ids)),
            finish_reason=reason,
        )

    # -- our decoder -----------------------------------------------------------------------------

    def _decoder(self) -> T5Runtime:
        """Our KV-cached decoder, loaded once on first use: it reads model.bin into its own arrays."""
        with self._decoder_lock:
            if self._decoder_runtime is None:
                from engine.runtime.t5 import T5Runtime

                # CuPy has no bfloat16: bfloat16 compute types run our decoder in float32, since
                # bfloat16 weights can exceed float16's range.
                half = self.compute_type in ("float16", "int8_float16")
                dtype = "float16" if self.device == "cuda" and half else "float32"
                self._decoder_runtime = T5Runtime.load(
                    self.model_dir, device=self.device, dtype=dtype, threads=self.intra_threads
                )
                if self.device == "cuda" and self.cuda_graphs:
                    self._decoder_runtime.use_cuda_graphs(True)
                    log.info("our decoder: CUDA graphs %s", self._decoder_runtime.graph_status())
                if self.device == "cpu":
                    from engine.runtime.qlinear import kernel_status

                    log.info("our decoder: %s", kernel_status())
            return self._decoder_runtime

    def _run_decoder(
        self, requests: Sequence[GenerationRequest], group: list[int], on_token: OnToken | None
    ) -> dict[int, Result]:
        """Run a group to completion on our decoder's continuous batch, streaming to on_token."""
        from engine.runtime.decoder_batch import run_to_completion

        def on_row_token(row: int, token_id: int) -> bool | None:
            return None if on_token is None else on_token(group[row], token_id)

        results = run_to_completion(self.decoder_batch(), [requests[i] for i in group], on_row_token)
        return dict(zip(group, results, strict=True))


def _groups(requests: Sequence[GenerationRequest]) -> list[list[int]]:
    """Indices of requests that share one decoder call, in first-seen order."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, request in enumerate(requests):
        params = request.params
        key: tuple[Any, ...] = params.batch_key()
        if needs_decoder(params):
            # One continuous batch for all of them: its rows are independent of each other
            # (contrastive rows of any alpha and k, sampling rows each with its own generator).
            key = ("own decoder",)
        elif params.spec.split_by_length:
            key = (*key, params.max_new_tokens)
        groups.setdefault(key, []).append(i)
    return list(groups.values())
