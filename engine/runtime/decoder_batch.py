"""Our decoder's batch: continuous batching over the T5 runtime, every strategy it runs.

Each row has its chooser (choosers.py: greedy, contrastive search, sampling). Per step: each
row's chooser proposes its candidates from its processed logits; ONE decoder step runs every
row's candidates against that row's KV cache (shared by its candidates, not copied); rows that
score by contrastive search (docs/contrastive.md) take the best ``(1 - α) p - α penalty``, the others
their one candidate; the chosen K/V row and hidden state are kept (copy-on-select) and only the
chosen hidden state goes through the lm_head.

Requests join between steps (their encoder and decoder-start step run then) and leave the step
they finish (EOS, max_new_tokens, a stop sequence, cancel), freeing their rows at once.

Rows of one candidate (greedy, sampling) and rows of several (contrastive search) step in two
groups, each with its own cache and decoder call: one call pads every sequence to the widest
chooser's candidates, so a greedy row beside a top_k=8 row would cost 8 rows of compute. Two calls
read the weights twice, which costs about one small step when both groups run; padding cost k - 1
rows per greedy sequence: a top_k=8 job beside 16 greedy rows ran 136 rows a step instead of 24
(tests/test_openai_api.py's resume test took 12 s that way, 3 s in groups).

``run_to_completion`` is the one loop that drives a batch until given requests are done.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

import numpy as np

from engine.errors import InvalidRequest, Overloaded
from engine.runtime.choosers import Chooser, History, contrastive_scores, degeneration_penalty
from engine.runtime.kv_cache import DecoderCache
from engine.runtime.logprobs import log_softmax, token_logprob
from engine.runtime.params import DecodingParams
from engine.runtime.protocols import OnToken
from engine.runtime.result import FinishReason, GenerationRequest, Result, TokenEvent, TokenLogprob, Usage
from engine.runtime.stop import Detokenize, StopSequences, stop_sequences
from engine.runtime.strategies import chooser_for
from engine.runtime.t5 import T5Runtime
from engine.runtime.xp import to_numpy

DEFAULT_MAX_ROWS = 256


# ---------------------------------------------------------------------- batch state
@dataclass
class _Active:
    """One request in the batch (mutable: it advances every step)."""

    request_id: str
    request: GenerationRequest
    chooser: Chooser
    history: History
    generated: list[int] = field(default_factory=list)
    logits: np.ndarray | None = None  # [V] float32: the chosen row's next-step logits
    stop: StopSequences | None = None
    # With params.logprobs: this step's log-softmax [V] (taken before the chooser processes the
    # logits), and one TokenLogprob per generated id.
    step_logprobs: np.ndarray | None = None
    logprobs: list[TokenLogprob] | None = None

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
            logprobs=None if self.logprobs is None else tuple(self.logprobs),
        )

    def record(self, token: int) -> TokenLogprob | None:
        """The generated ``token``'s log-probability, when this request asked for them."""
        if self.logprobs is None or self.step_logprobs is None:
            return None
        alternatives = self.params.logprobs or 0
        entry = token_logprob(self.step_logprobs, token, alternatives)
        self.logprobs.append(entry)
        return entry


@dataclass
class _Group:
    """Sequences whose candidates run in one decoder call, padded to the widest of them."""

    active: list[_Active] = field(default_factory=list)  # aligned with the cache's rows
    pending: list[_Active] = field(default_factory=list)
    cache: DecoderCache | None = None

    def members(self) -> itertools.chain[_Active]:
        return itertools.chain(self.active, self.pending)


class DecoderBatch:
    """Continuous batching over our T5 runtime (``protocols.DecoderBatchLike``).

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
        # One candidate a step (greedy, sampling) | several (contrastive search): see the module doc.
        self._groups = (_Group(), _Group())
        self._cancelled: set[str] = set()

    # ------------------------------------------------------------------ membership
    def __len__(self) -> int:
        return sum(len(g.active) + len(g.pending) for g in self._groups)

    def _members(self) -> itertools.chain[_Active]:
        return itertools.chain.from_iterable(g.members() for g in self._groups)

    @property
    def rows(self) -> int:
        """Decoder rows in use per step (sum of the requests' candidate counts)."""
        return sum(s.chooser.width for s in self._members())

    def fits(self, request: GenerationRequest) -> bool:
        return self.rows + chooser_for(request.params, self.runtime.eos_token_id).width <= self.max_rows

    def add(self, request_id: str, request: GenerationRequest) -> None:
        """Queue ``request`` to join before the next step (its encoder runs then)."""
        params = request.params
        chooser = chooser_for(params, self.runtime.eos_token_id, request.draw)
        shape = self.runtime.shape
        if not request.input_ids:
            raise InvalidRequest("a prompt must have at least one token")
        if min(request.input_ids) < 0 or max(request.input_ids) >= shape.vocab_size:
            raise InvalidRequest(f"input ids must lie in [0, {shape.vocab_size})")
        k = chooser.width
        if k > shape.vocab_size:
            raise InvalidRequest(f"top_k ({k}) exceeds the vocabulary size ({shape.vocab_size})")
        if k > self.max_rows:
            raise InvalidRequest(f"top_k ({k}) exceeds this batch's {self.max_rows} rows per step")
        if any(s.request_id == request_id for s in self._members()):
            raise InvalidRequest(f"request id {request_id!r} is already in the batch")
        if not self.fits(request):
            raise Overloaded(f"the decoder batch is full ({self.rows} of {self.max_rows} rows in use)")
        if params.stop and self.detokenize is None:
            raise InvalidRequest("stop sequences need the tokenizer: build this batch with detokenize")
        self._cancelled.discard(request_id)
        self._groups[k > 1].pending.append(
            _Active(
                request_id=request_id,
                request=request,
                chooser=chooser,
                history=History([self.runtime.decoder_start_token_id], params.no_repeat_ngram_size),
                stop=None if self.detokenize is None else stop_sequences(params.stop, self.detokenize),
                logprobs=None if params.logprobs is None else [],
            )
        )

    def cancel(self, request_id: str) -> None:
        if any(s.request_id == request_id for s in self._members()):
            self._cancelled.add(request_id)

    # ------------------------------------------------------------------ one step
    def step(self) -> list[TokenEvent]:
        """One decoder step for every sequence (a call per group that has any)."""
        events = self._drop_cancelled()
        for group in self._groups:
            if group.pending:
                self._admit(group)
            if group.active:
                events.extend(self._step(group))
        return events

    def _step(self, group: _Group) -> list[TokenEvent]:
        events: list[TokenEvent] = []
        cache = group.cache
        assert cache is not None  # set whenever requests are active
        rt = self.runtime
        active = group.active
        batch = len(active)
        choosers = [s.chooser for s in active]
        width = max(c.width for c in choosers)

        # 1. candidates from each sequence's processed next-step logits
        tokens, cand_probs = self._candidates(active, width, rt.threads)
        # 2. one decoder step of B x width rows over the shared caches
        out = rt.decoder_step(cache, tokens)
        # 3. the contrastive score: (1 - α) p - α max cosine with the context
        choice = np.zeros(batch, dtype=np.int64)
        if any(c.needs_hidden for c in choosers):
            degeneration = degeneration_penalty(out.unit_hidden, cache.context, cache.lengths, rt.threads)
            alphas = [c.alpha for c in choosers]
            scores = contrastive_scores(cand_probs, degeneration, alphas, [c.width for c in choosers])
            choice = scores.argmax(axis=-1)

        # 4. keep the chosen rows; the lm_head runs for the sequences that go on
        chosen_hidden = cache.commit(out, choice)
        keep: list[int] = []
        for row, seq in enumerate(active):
            token = int(tokens[row, choice[row]])
            if token == rt.eos_token_id:
                events.append(TokenEvent(seq.request_id, -1, self._result(seq, FinishReason.EOS)))
                continue
            seq.generated.append(token)
            seq.history.append(token)
            lp = seq.record(token)
            cut = None if seq.stop is None else seq.stop.check(seq.generated)
            if cut is not None:
                result = seq.result(FinishReason.STOP, cut.text)
                events.append(TokenEvent(seq.request_id, token, result, lp))
                continue
            if len(seq.generated) >= seq.params.max_new_tokens:
                events.append(TokenEvent(seq.request_id, token, self._result(seq, FinishReason.LENGTH), lp))
                continue
            events.append(TokenEvent(seq.request_id, token, logprob=lp))
            keep.append(row)
        if keep:
            logits = to_numpy(rt.logits(chosen_hidden[rt.xp.asarray(keep)])).astype(np.float32, copy=False)
            for i, row in enumerate(keep):
                active[row].logits = logits[i]
        self._retain(group, keep)
        return events

    # ------------------------------------------------------------------ helpers
    def _result(self, seq: _Active, reason: FinishReason) -> Result:
        return seq.result(reason, "" if self.detokenize is None else self.detokenize(seq.generated))

    @staticmethod
    def _candidates(active: Sequence[_Active], width: int, threads: int) -> tuple[np.ndarray, np.ndarray]:
        """Each sequence's candidate ids [B, width] and their probabilities (rows past a
        sequence's own width repeat its first candidate and are never chosen): every row's logits
        processed, then each chooser kind's rows chosen together (``Chooser.choose_rows``, over
        ``threads``)."""
        tokens = np.empty((len(active), width), dtype=np.int64)
        cand_probs = np.zeros((len(active), width), dtype=np.float32)
        by_kind: dict[type[Chooser], list[int]] = {}
        for row, seq in enumerate(active):
            assert seq.logits is not None  # set by the step that admitted it, then by every step
            if seq.logprobs is not None:
                seq.step_logprobs = log_softmax(seq.logits)  # before the chooser's processors
            seq.chooser.process(seq.logits, seq.history)
            by_kind.setdefault(type(seq.chooser), []).append(row)
        for kind, rows in by_kind.items():  # each kind's rows at once (Contrastive: one kernel call)
            answers = kind.choose_rows(
                [active[r].chooser for r in rows], [cast(np.ndarray, active[r].logits) for r in rows], threads
            )
            for row, (ids, probs) in zip(rows, answers, strict=True):
                tokens[row, : len(ids)] = ids
                tokens[row, len(ids) :] = ids[0]
                cand_probs[row, : len(ids)] = probs
        return tokens, cand_probs

    def _drop_cancelled(self) -> list[TokenEvent]:
        if not self._cancelled:
            return []
        events = [
            TokenEvent(s.request_id, -1, self._result(s, FinishReason.CANCELLED))
            for s in self._members()
            if s.request_id in self._cancelled
        ]
        for group in self._groups:
            group.pending = [s for s in group.pending if s.request_id not in self._cancelled]
            self._retain(
                group, [i for i, s in enumerate(group.active) if s.request_id not in self._cancelled]
            )
        self._cancelled.clear()
        return events

    @staticmethod
    def _retain(group: _Group, keep: Sequence[int]) -> None:
        if len(keep) == len(group.active):
            return
        group.active = [group.active[i] for i in keep]
        if group.cache is not None:
            group.cache.filter(keep)
            if not keep:
                group.cache = None

    def _admit(self, group: _Group) -> None:
        """Encode the group's newcomers, run their decoder-start step (h_0 and the first logits),
        and append their rows to the group's running batch."""
        rt = self.runtime
        joining, group.pending = group.pending, []
        encoded = rt.encode_batch([s.request.input_ids for s in joining])
        cache = rt.new_cache(encoded, capacity=max(s.params.max_new_tokens for s in joining) + 1)
        start = np.full((len(joining), 1), rt.decoder_start_token_id, dtype=np.int64)
        out = rt.decoder_step(cache, start)
        hidden = cache.commit(out, np.zeros(len(joining), dtype=np.int64))
        logits = to_numpy(rt.logits(hidden)).astype(np.float32, copy=False)
        for i, seq in enumerate(joining):
            seq.logits = logits[i]
        if group.cache is None:
            group.cache = cache
        else:
            group.cache.concatenate(cache)
        group.active.extend(joining)


def run_to_completion(
    batch: DecoderBatch, requests: Sequence[GenerationRequest], on_token: OnToken | None = None
) -> list[Result]:
    """The one loop that drives our decoder: run ``requests`` through ``batch`` until each has its
    Result (in order), admitting them as rows free up.

    ``on_token(index, token id)`` sees every generated token but the EOS; True stops that request
    (it finishes CANCELLED with the tokens so far)."""
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


def run_on_decoder(
    runtime: T5Runtime,
    requests: Sequence[GenerationRequest],
    max_rows: int = DEFAULT_MAX_ROWS,
    on_token: OnToken | None = None,
    detokenize: Detokenize | None = None,
) -> list[Result]:
    """``run_to_completion`` on a new batch of ``runtime`` (tests and benchmarks)."""
    return run_to_completion(DecoderBatch(runtime, max_rows, detokenize), requests, on_token)
