"""Contrastive search (Su et al. 2022) exactly as Transformers 4.55 runs it, with continuous batching.

See docs/contrastive.md. Per sequence and step: the processed logits' softmax gives the top k
candidates; ONE decoder step runs every sequence's k candidates against that sequence's shared
KV cache; each candidate's degeneration penalty is its largest cosine similarity with the
sequence's context (the final hidden states so far); the best ``(1 - α) p - α penalty`` wins, its
K/V row and hidden state are kept (copy-on-select) and only its hidden state goes through the
lm_head. With k = 1 (or α = 0) this is a plain greedy decoder on the same code path. A sampling
row (a request with a seed) draws its one candidate from Transformers' warpers (temperature,
top-k, top-p) with a generator of its own, so its tokens do not depend on its batch.

Requests join between steps (their encoder and decoder-start step run then) and leave the step
they finish, freeing their rows at once.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from engine.errors import InvalidRequest, Overloaded
from engine.runtime.kv_cache import Array, DecoderCache
from engine.runtime.params import DecodingParams, Strategy
from engine.runtime.protocols import OnToken
from engine.runtime.result import FinishReason, GenerationRequest, Result, TokenEvent, Usage
from engine.runtime.stop import Detokenize, StopSequences, stop_sequences
from engine.runtime.t5 import T5Runtime
from engine.runtime.xp import to_numpy

DEFAULT_MAX_ROWS = 256


# ---------------------------------------------------------------------- logits processors
@dataclass
class _History:
    """A sequence's decoder input so far (the decoder-start token, then every generated token) and
    its n-grams, kept incrementally for no_repeat_ngram_size."""

    tokens: list[int]
    ngram_size: int
    ngrams: dict[tuple[int, ...], list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        start, self.tokens = self.tokens, []
        for t in start:
            self.append(t)

    def append(self, token: int) -> None:
        self.tokens.append(token)
        n = self.ngram_size
        if n > 0 and len(self.tokens) >= n:
            self.ngrams.setdefault(tuple(self.tokens[len(self.tokens) - n : -1]), []).append(token)

    def banned(self) -> list[int]:
        n, cur = self.ngram_size, len(self.tokens)
        if n <= 0 or cur + 1 < n:
            return []
        return self.ngrams.get(tuple(self.tokens[cur + 1 - n :]), [])


def process_logits(scores: np.ndarray, history: _History, params: DecodingParams, eos_token_id: int) -> None:
    """Transformers 4.55's processors for these parameters, in its order (``_get_logits_processor``):
    repetition penalty, no-repeat-ngram, min_new_tokens. In place on one row of float32 logits."""
    if params.repetition_penalty != 1.0:
        # Over the decoder input ids, decoder-start token included, each distinct id once.
        ids = np.unique(np.asarray(history.tokens, dtype=np.int64))
        picked = scores[ids]
        scores[ids] = np.where(
            picked < 0,
            picked * np.float32(params.repetition_penalty),
            picked / np.float32(params.repetition_penalty),
        )
    banned = history.banned()
    if banned:
        scores[banned] = -np.inf
    generated = len(history.tokens) - 1
    if generated < params.min_new_tokens:
        scores[eos_token_id] = -np.inf


def warp_logits(scores: np.ndarray, params: DecodingParams) -> np.ndarray:
    """Transformers 4.55's sampling warpers in its order (``_get_logits_processor``): temperature,
    top-k (``top_k`` 0: off), top-p, each keeping at least one token. A new float32 row; removed
    tokens are -inf."""
    logits = np.array(scores, dtype=np.float32)
    if params.temperature != 1.0:
        logits /= np.float32(params.temperature)
    vocab = logits.shape[0]
    if 0 < params.top_k < vocab:
        kth = np.partition(logits, vocab - params.top_k)[vocab - params.top_k]
        logits[logits < kth] = -np.inf
    if params.top_p < 1.0:
        # Ascending, as Transformers sorts. Tokens already removed (-inf: top-k's, the processors')
        # sort first with probability 0 and stay removed, so only the others are sorted.
        kept = np.flatnonzero(logits > -np.inf)
        order = kept[np.argsort(logits[kept], kind="stable")]
        cumulative = np.cumsum(softmax_rows(logits[order][None])[0])
        remove = cumulative <= np.float32(1.0 - params.top_p)
        remove[-1] = False
        logits[order[remove]] = -np.inf
    return logits


def draw(logits: np.ndarray, rng: np.random.Generator) -> int:
    """One token from softmax(logits) with ``rng``: the same token for the same generator state."""
    probs = np.exp(logits.astype(np.float64) - float(logits.max()))
    cumulative = np.cumsum(probs)
    token = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
    return min(token, logits.shape[0] - 1)


def softmax_rows(scores: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float32 (the whole vocabulary, as Transformers does before its top-k)."""
    shifted = scores - scores.max(axis=-1, keepdims=True)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=-1, keepdims=True)
    return shifted


def top_k(probs: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries, largest first, equal values by lower index (torch.topk's
    order on CPU). argpartition finds the k-th value; ties at that value are settled by index."""
    if k >= probs.shape[0]:
        return np.lexsort((np.arange(probs.shape[0]), -probs))[:k]
    kth = probs[np.argpartition(-probs, k - 1)[k - 1]]
    above = np.flatnonzero(probs > kth)
    at = np.flatnonzero(probs == kth)[: k - len(above)]
    chosen = np.concatenate([above, at])
    return chosen[np.lexsort((chosen, -probs[chosen]))]


def degeneration_penalty(unit_hidden: Array, context: Array, lengths: np.ndarray) -> np.ndarray:
    """max_j cos(g_i, C_j) per candidate [B, m]: one [m x d] by [d x t] product per sequence over
    its unit-normalized candidates and context (positions past ``lengths[b]`` are not its context)."""
    t = int(lengths.max())
    cos = to_numpy(unit_hidden @ context[:, :t].swapaxes(-1, -2)).astype(np.float32, copy=False)
    outside = np.arange(t)[None, None, :] >= lengths[:, None, None]
    cos = np.where(outside, -np.inf, cos)
    return np.asarray(cos.max(axis=-1), dtype=np.float32)


def contrastive_scores(
    cand_probs: np.ndarray, degeneration: np.ndarray, alphas: Sequence[float], ks: Sequence[int]
) -> np.ndarray:
    """(1 - α) p - α max-cosine per candidate [B, width]; a row's candidates past its own k get -inf."""
    # (1 - α) is formed in double and then rounded, as torch does with a Python scalar.
    keep_p = np.array([[1.0 - a] for a in alphas], dtype=np.float32)
    alpha = np.array([[a] for a in alphas], dtype=np.float32)
    score = keep_p * cand_probs - alpha * degeneration
    for row, k in enumerate(ks):
        score[row, k:] = -np.inf
    return score


# ---------------------------------------------------------------------- batch state
@dataclass
class _Active:
    """One request in the batch (mutable: it advances every step)."""

    request_id: str
    request: GenerationRequest
    k: int
    alpha: float
    history: _History
    generated: list[int] = field(default_factory=list)
    logits: np.ndarray | None = None  # [V] float32: the chosen row's next-step logits
    rng: np.random.Generator | None = None  # sampling: the request's own generator (its seed)
    stop: StopSequences | None = None

    @property
    def params(self) -> DecodingParams:
        return self.request.params

    def result(self, reason: FinishReason, text: str = "") -> Result:
        ids = tuple(self.generated)
        return Result(
            text=text,
            token_ids=ids,
            usage=Usage(prompt_tokens=len(self.request.input_ids), completion_tokens=len(ids)),
            finish_reason=reason,
        )


def candidate_count(params: DecodingParams) -> int:
    """Rows one sequence takes per decoder step: top_k for contrastive search, 1 for greedy."""
    return params.top_k if params.strategy is Strategy.CONTRASTIVE else 1


class ContrastiveBatch:
    """Continuous batching over our T5 runtime (``ContrastiveBatchLike``).

    With ``detokenize`` (the model's tokenizer) each Result carries its text, and stop sequences
    are watched after every step; without it texts are empty and stop sequences refused."""

    def __init__(
        self, runtime: T5Runtime, max_rows: int = DEFAULT_MAX_ROWS, detokenize: Detokenize | None = None
    ) -> None:
        if max_rows < 1:
            raise InvalidRequest(f"max_rows must be at least 1, got {max_rows}")
        self.runtime = runtime
        self.max_rows = max_rows
        self.detokenize = detokenize
        self._active: list[_Active] = []  # aligned with the cache's rows
        self._pending: list[_Active] = []
        self._cancelled: set[str] = set()
        self._cache: DecoderCache | None = None

    # ------------------------------------------------------------------ membership
    def __len__(self) -> int:
        return len(self._active) + len(self._pending)

    @property
    def rows(self) -> int:
        """Decoder rows in use per step (sum of the requests' candidate counts)."""
        return sum(s.k for s in itertools.chain(self._active, self._pending))

    def fits(self, request: GenerationRequest) -> bool:
        return self.rows + candidate_count(request.params) <= self.max_rows

    def add(self, request_id: str, request: GenerationRequest) -> None:
        """Queue ``request`` to join before the next step (its encoder runs then)."""
        params = request.params
        if params.strategy not in (Strategy.CONTRASTIVE, Strategy.GREEDY, Strategy.SAMPLE):
            raise InvalidRequest(
                "the contrastive decoder runs contrastive search, greedy decoding and sampling, "
                f"not {params.strategy.value}"
            )
        shape = self.runtime.shape
        if not request.input_ids:
            raise InvalidRequest("a prompt must have at least one token")
        if min(request.input_ids) < 0 or max(request.input_ids) >= shape.vocab_size:
            raise InvalidRequest(f"input ids must lie in [0, {shape.vocab_size})")
        k = candidate_count(params)
        if k > shape.vocab_size:
            raise InvalidRequest(f"top_k ({k}) exceeds the vocabulary size ({shape.vocab_size})")
        if k > self.max_rows:
            raise InvalidRequest(f"top_k ({k}) exceeds this batch's {self.max_rows} rows per step")
        if any(s.request_id == request_id for s in itertools.chain(self._active, self._pending)):
            raise InvalidRequest(f"request id {request_id!r} is already in the batch")
        if not self.fits(request):
            raise Overloaded(f"the contrastive batch is full ({self.rows} of {self.max_rows} rows in use)")
        if params.stop and self.detokenize is None:
            raise InvalidRequest("stop sequences need the tokenizer: build this batch with detokenize")
        self._cancelled.discard(request_id)
        self._pending.append(
            _Active(
                request_id=request_id,
                request=request,
                k=k,
                alpha=params.penalty_alpha if k > 1 else 0.0,
                history=_History([self.runtime.decoder_start_token_id], params.no_repeat_ngram_size),
                rng=(
                    np.random.default_rng((params.seed, request.draw) if params.seed is not None else None)
                    if params.strategy is Strategy.SAMPLE
                    else None
                ),
                stop=None if self.detokenize is None else stop_sequences(params.stop, self.detokenize),
            )
        )

    def cancel(self, request_id: str) -> None:
        if any(s.request_id == request_id for s in itertools.chain(self._active, self._pending)):
            self._cancelled.add(request_id)

    # ------------------------------------------------------------------ one step
    def step(self) -> list[TokenEvent]:
        events = self._drop_cancelled()
        if self._pending:
            self._admit()
        if not self._active:
            return events
        cache = self._cache
        assert cache is not None  # set whenever requests are active
        rt = self.runtime
        batch = len(self._active)
        width = max(s.k for s in self._active)

        # 1. candidates from each sequence's processed next-step logits
        tokens, cand_probs = self._candidates(width)
        # 2. one decoder step of B x width rows over the shared caches
        out = rt.decoder_step(cache, tokens)
        # 3. the contrastive score: (1 - α) p - α max cosine with the context
        choice = np.zeros(batch, dtype=np.int64)
        if width > 1:
            degeneration = degeneration_penalty(out.unit_hidden, cache.context, cache.lengths)
            alphas = [s.alpha for s in self._active]
            choice = contrastive_scores(cand_probs, degeneration, alphas, [s.k for s in self._active]).argmax(
                axis=-1
            )

        # 4. keep the chosen rows; the lm_head runs for the sequences that go on
        chosen_hidden = cache.commit(out, choice)
        keep: list[int] = []
        for row, seq in enumerate(self._active):
            token = int(tokens[row, choice[row]])
            if token == rt.eos_token_id:
                events.append(TokenEvent(seq.request_id, -1, self._result(seq, FinishReason.EOS)))
                continue
            seq.generated.append(token)
            seq.history.append(token)
            cut = None if seq.stop is None else seq.stop.check(seq.generated)
            if cut is not None:
                events.append(TokenEvent(seq.request_id, token, seq.result(FinishReason.STOP, cut.text)))
                continue
            if len(seq.generated) >= seq.params.max_new_tokens:
                events.append(TokenEvent(seq.request_id, token, self._result(seq, FinishReason.LENGTH)))
                continue
            events.append(TokenEvent(seq.request_id, token))
            keep.append(row)
        if keep:
            logits = to_numpy(rt.logits(chosen_hidden[rt.xp.asarray(keep)])).astype(np.float32, copy=False)
            for i, row in enumerate(keep):
                self._active[row].logits = logits[i]
        self._retain(keep)
        return events

    # ------------------------------------------------------------------ helpers
    def _result(self, seq: _Active, reason: FinishReason) -> Result:
        return seq.result(reason, "" if self.detokenize is None else self.detokenize(seq.generated))

    def _candidates(self, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Each sequence's top-k token ids [B, width] and their probabilities (rows past a
        sequence's own k repeat its best token and are never chosen)."""
        batch = len(self._active)
        scores = np.stack([s.logits for s in self._active if s.logits is not None])
        for row, seq in enumerate(self._active):
            process_logits(scores[row], seq.history, seq.params, self.runtime.eos_token_id)
        probs = softmax_rows(scores)
        tokens = np.empty((batch, width), dtype=np.int64)
        cand_probs = np.zeros((batch, width), dtype=np.float32)
        for row, seq in enumerate(self._active):
            if seq.rng is not None:  # sampling: one drawn candidate (k = 1, chosen as is)
                tokens[row] = draw(warp_logits(scores[row], seq.params), seq.rng)
                cand_probs[row, 0] = 1.0
                continue
            ids = top_k(probs[row], seq.k)
            tokens[row, : seq.k] = ids
            tokens[row, seq.k :] = ids[0]
            cand_probs[row, : seq.k] = probs[row, ids]
        return tokens, cand_probs

    def _drop_cancelled(self) -> list[TokenEvent]:
        if not self._cancelled:
            return []
        events = [
            TokenEvent(s.request_id, -1, self._result(s, FinishReason.CANCELLED))
            for s in itertools.chain(self._active, self._pending)
            if s.request_id in self._cancelled
        ]
        self._pending = [s for s in self._pending if s.request_id not in self._cancelled]
        self._retain([i for i, s in enumerate(self._active) if s.request_id not in self._cancelled])
        self._cancelled.clear()
        return events

    def _retain(self, keep: Sequence[int]) -> None:
        if len(keep) == len(self._active):
            return
        self._active = [self._active[i] for i in keep]
        if self._cache is not None:
            self._cache.filter(keep)
            if not keep:
                self._cache = None

    def _admit(self) -> None:
        """Encode the newcomers, run their decoder-start step (h_0 and the first logits), and
        append their rows to the running batch."""
        rt = self.runtime
        joining, self._pending = self._pending, []
        encoded = rt.encode_batch([s.request.input_ids for s in joining])
        cache = rt.new_cache(encoded, capacity=max(s.params.max_new_tokens for s in joining) + 1)
        start = np.full((len(joining), 1), rt.decoder_start_token_id, dtype=np.int64)
        out = rt.decoder_step(cache, start)
        hidden = cache.commit(out, np.zeros(len(joining), dtype=np.int64))
        logits = to_numpy(rt.logits(hidden)).astype(np.float32, copy=False)
        for i, seq in enumerate(joining):
            seq.logits = logits[i]
        if self._cache is None:
            self._cache = cache
        else:
            self._cache.concatenate(cache)
        self._active.extend(joining)


def generate_contrastive(
    runtime: T5Runtime,
    requests: Sequence[GenerationRequest],
    max_rows: int = DEFAULT_MAX_ROWS,
    on_token: OnToken | None = None,
    detokenize: Detokenize | None = None,
) -> list[Result]:
    """Run ``requests`` to completion through one ContrastiveBatch (admitting as rows free up).

    ``on_token(index, token id)`` sees every generated token but the EOS; True stops that request
    (it finishes CANCELLED with the tokens so far)."""
    batch = ContrastiveBatch(runtime, max_rows=max_rows, detokenize=detokenize)
    results: dict[str, Result] = {}
    waiting = [(str(i), r) for i, r in enumerate(requests)]
    waiting.reverse()
    while waiting or len(batch):
        while waiting and batch.fits(waiting[-1][1]):
            batch.add(*waiting.pop())
        if not len(batch) and waiting:
            batch.add(*waiting.pop())  # raises the clear error for a request that can never fit
        for event in batch.step():
            stop = (
                on_token is not None
                and event.token_id >= 0
                and on_token(int(event.request_id), event.token_id)
            )
            if event.result is not None:
                results[event.request_id] = event.result
            elif stop:
                batch.cancel(event.request_id)
    return [results[str(i)] for i in range(len(requests))]


# The names engine/runtime/engine.py calls.
run_to_completion = generate_contrastive


class _HasModel(Protocol):
    model_dir: Path

    @property
    def device(self) -> str: ...


def load_runtime(engine: _HasModel) -> T5Runtime:
    """The engine's model folder on the engine's device, in float32."""
    return T5Runtime.load(engine.model_dir, device=engine.device)
