"""How a row of our decoder picks its next token: one chooser object per row (TGI's
``NextTokenChooser``), built once from the request's parameters by ``chooser_for``.

A chooser applies the logits processors in force (Transformers 4.55's, in its order: ``process``),
then proposes ``width`` candidate ids with their probabilities (``choose``; a step hands each
chooser class all its rows at once through ``choose_rows``); the decoder runs one row per candidate.
A chooser that ``needs_hidden`` has the batch score its candidates by contrastive search (their
hidden states' degeneration penalty, docs/contrastive.md, weighted by ``alpha``) and keep the best;
otherwise the first candidate is the choice and the decoder needs no hidden states beyond the
chosen row's.

Adding a strategy: a chooser class (here or in a module of its own) and its row in the strategy
table, engine/runtime/strategies.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from engine.runtime import choose_ops
from engine.runtime.kv_cache import Array
from engine.runtime.xp import to_numpy

if TYPE_CHECKING:
    from engine.runtime.params import DecodingParams


# ---------------------------------------------------------------------- logits processors
@dataclass
class History:
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


def process_logits(scores: np.ndarray, history: History, params: DecodingParams, eos_token_id: int) -> None:
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


# Up to this k, top_k takes k argmax passes (each picks the lowest index among equal values:
# torch.topk's order) instead of an argpartition: on 32,128 entries 4 passes take about a quarter
# of argpartition's 46 us, a contrastive step calls it once per sequence.
ARGMAX_PASSES_MAX_K = 8


def top_k(probs: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries, largest first, equal values by lower index (torch.topk's
    order on CPU). argpartition finds the k-th value; ties at that value are settled by index."""
    if k <= ARGMAX_PASSES_MAX_K and k < probs.shape[0]:
        work = probs.copy()
        chosen = np.empty(k, dtype=np.int64)
        for i in range(k):
            chosen[i] = j = int(np.argmax(work))
            work[j] = -np.inf
        return chosen
    if k >= probs.shape[0]:
        return np.lexsort((np.arange(probs.shape[0]), -probs))[:k]
    kth = probs[np.argpartition(-probs, k - 1)[k - 1]]
    above = np.flatnonzero(probs > kth)
    at = np.flatnonzero(probs == kth)[: k - len(above)]
    chosen = np.concatenate([above, at])
    return chosen[np.lexsort((chosen, -probs[chosen]))]


def degeneration_penalty(
    unit_hidden: Array, context: Array, lengths: np.ndarray, threads: int = 1
) -> np.ndarray:
    """max_j cos(g_i, C_j) per candidate [B, m]: one [m x d] by [d x t] product per sequence over
    its unit-normalized candidates and context (positions past ``lengths[b]`` are not its context).
    On the host in float32 the compiled kernel answers (engine/runtime/choose_ops.py: within float32
    rounding of this, about 10x less time at batch 16; its sequences split over ``threads``); this
    numpy code is its reference and the fallback."""
    if (
        isinstance(unit_hidden, np.ndarray)
        and isinstance(context, np.ndarray)
        and unit_hidden.dtype == context.dtype == np.float32
        and choose_ops.available_for("degeneration_penalty")
    ):
        return choose_ops.degeneration_penalty(unit_hidden, context, lengths, threads)
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


# ---------------------------------------------------------------------- choosers
@dataclass
class Chooser:
    """The processors of ``params`` plus a choice among candidates; subclasses say which."""

    params: DecodingParams
    eos_token_id: int
    width: int = 1  # decoder rows this row takes per step (its candidates)
    alpha: float = 0.0  # the weight of the degeneration penalty, for choosers that need_hidden
    # Whether the batch scores the candidates by their hidden states (contrastive search).
    needs_hidden: ClassVar[bool] = False

    @classmethod
    def for_request(cls, params: DecodingParams, eos_token_id: int, draw_index: int) -> Chooser:
        """The chooser of one row; ``draw_index``: which prompt of its request it is."""
        return cls(params, eos_token_id)

    def process(self, scores: np.ndarray, history: History) -> None:
        """The logits processors in force, in place on this row's next-step logits [V] (float32)."""
        process_logits(scores, history, self.params, self.eos_token_id)

    def choose(self, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Candidate ids [width] and their probabilities [width] from this row's processed logits."""
        raise NotImplementedError

    @classmethod
    def choose_rows(
        cls, choosers: Sequence[Chooser], scores: Sequence[np.ndarray], threads: int
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """``choose`` for several rows of this class at once (processed logits, one row each):
        a row at a time here; a class whose rows gain from one call overrides it."""
        return [c.choose(s) for c, s in zip(choosers, scores, strict=True)]


class Greedy(Chooser):
    """The most likely token (``argmax`` of the processed logits, first index on ties, as torch)."""

    def choose(self, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.array([int(np.argmax(scores))]), _ONE


@dataclass
class Contrastive(Chooser):
    """The top k of the softmax over the whole vocabulary (Transformers' order), scored later."""

    needs_hidden: ClassVar[bool] = True

    @classmethod
    def for_request(cls, params: DecodingParams, eos_token_id: int, draw_index: int) -> Chooser:
        return cls(params, eos_token_id, width=params.top_k, alpha=params.penalty_alpha)

    def choose(self, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # The compiled kernel where it runs (engine/runtime/choose_ops.py: the same ids, about 6x
        # less time a row); softmax_rows and top_k are its reference and the fallback.
        if self.width <= scores.shape[0] and choose_ops.available():
            return choose_ops.top_k_softmax(scores, self.width)
        probs = softmax_rows(scores[None])[0]
        ids = top_k(probs, self.width)
        return ids, probs[ids]

    @classmethod
    def choose_rows(
        cls, choosers: Sequence[Chooser], scores: Sequence[np.ndarray], threads: int
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        # Rows of one width in one kernel call over the threads (each row's answer is choose's);
        # otherwise a row at a time.
        widths = {c.width for c in choosers}
        if len(scores) > 1 and len(widths) == 1 and choose_ops.available_for("top_k_softmax_rows"):
            (k,) = widths
            if all(k <= s.shape[0] for s in scores):
                ids, probs = choose_ops.top_k_softmax_rows(scores, k, threads)
                return list(zip(ids, probs, strict=True))
        return super().choose_rows(choosers, scores, threads)


@dataclass
class Sampling(Chooser):
    """One token drawn after Transformers' warpers, from a generator of the row's own."""

    rng: np.random.Generator = field(default_factory=np.random.default_rng)

    @classmethod
    def for_request(cls, params: DecodingParams, eos_token_id: int, draw_index: int) -> Chooser:
        # Prompt i of a seeded request draws from the generator seeded with (seed, i); unseeded
        # requests from fresh entropy.
        seed = None if params.seed is None else (params.seed, draw_index)
        return cls(params, eos_token_id, rng=np.random.default_rng(seed))

    def choose(self, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.array([draw(warp_logits(scores, self.params), self.rng)]), _ONE


_ONE = np.ones(1, dtype=np.float32)
