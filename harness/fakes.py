"""A fake engine for serving tests and benchmarks: implements engine/runtime/protocols.py's
``EngineLike`` (batched calls and a continuous contrastive batch) without a model.

Outputs are a deterministic function of the input ids (``expected_tokens``), so a test can check
every job's result. Time is a cost model: each decoder step sleeps ``step_delay_s`` plus
``row_delay_s`` per unfinished row, and a batched call returns when its longest row is done, as a
CTranslate2 call does; so batching pays off, and a long row keeps short ones waiting for their results.
A prompt word ``eos:N`` makes that prompt end with EOS after N tokens; the contrastive batch refuses
prompts with the word ``reject``.
"""

from __future__ import annotations

import asyncio
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.config import Config
from engine.errors import InvalidRequest, Overloaded, PromptTooLong
from engine.metrics import Metrics
from engine.model.manifest import Manifest
from engine.runtime.protocols import EngineLike, OnToken
from engine.runtime.result import FinishReason, GenerationRequest, Result, TokenEvent, Usage
from engine.serving.clock import Clock
from engine.serving.service import JobService
from engine.serving.store.base import JobStore
from engine.serving.store.sqlite import SqliteJobStore

EOS = 1
VOCAB = 1000

FAKE_MANIFEST = Manifest(
    source="fake:tiny",
    quantization="int8",
    family="t5-v1.1",
    d_model=32,
    d_ff=64,
    d_kv=8,
    num_heads=4,
    num_encoder_layers=2,
    num_decoder_layers=2,
    vocab_size=VOCAB,
    feed_forward="gated-gelu",
    tied_embeddings=False,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    layer_norm_epsilon=1e-6,
    max_input_length=64,
    random_weights=True,
)


# Ids from EOS_BASE up are reserved for the ``eos:N`` words; other words hash below them.
EOS_BASE = VOCAB - 100
MAX_EOS_AFTER = 64


def _word_id(word: str) -> int:
    if word.startswith("eos:") and word[4:].isdigit() and int(word[4:]) <= MAX_EOS_AFTER:
        return EOS_BASE + int(word[4:])
    return 2 + zlib.crc32(word.encode()) % (EOS_BASE - 2)


def fake_tokenize(prompt: str) -> tuple[int, ...]:
    """One id per whitespace-separated word, then EOS."""
    return (*(_word_id(w) for w in prompt.split()), EOS)


REJECT_ID = 2 + zlib.crc32(b"reject") % (EOS_BASE - 2)  # the contrastive batch refuses a prompt with it


def _eos_after(input_ids: Sequence[int]) -> int | None:
    for i in input_ids:
        if EOS_BASE <= i <= EOS_BASE + MAX_EOS_AFTER:
            return i - EOS_BASE
    return None


def expected_tokens(input_ids: Sequence[int], max_new_tokens: int) -> list[int]:
    """What the fake generates for these ids (without EOS), as a test computes it independently."""
    stop = _eos_after(input_ids)
    n = max_new_tokens if stop is None else min(stop, max_new_tokens)
    return [_token(input_ids, step) for step in range(n)]


def _token(input_ids: Sequence[int], step: int) -> int:
    return 2 + (sum(input_ids) * 31 + step * 7919) % (VOCAB - 2)


async def start_service(
    engine: EngineLike | None = None,
    clock: Clock | None = None,
    store: JobStore | None = None,
    metrics: Metrics | None = None,
    **config: Any,
) -> JobService:
    """A started JobService over an in-memory store (unless given) and a FakeEngine."""
    cfg = Config(**{"max_queue_delay_ms": 0.0, **config})
    service = JobService(cfg, store or SqliteJobStore(":memory:"), engine or FakeEngine(), metrics, clock)
    await service.start()
    return service


async def until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Poll (real time) until ``predicate()``; fails the test with a clear message otherwise."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached within {timeout_s} s")
        await asyncio.sleep(0.002)


def fake_text(token_ids: Sequence[int]) -> str:
    return " ".join(f"w{t}" for t in token_ids)


@dataclass
class _Row:
    request: GenerationRequest
    out: list[int] = field(default_factory=list)
    stop_at: int | None = None

    def __post_init__(self) -> None:
        self.stop_at = _eos_after(self.request.input_ids)

    def next_token(self) -> int | None:
        """None: EOS now."""
        if self.stop_at is not None and len(self.out) >= self.stop_at:
            return None
        return _token(self.request.input_ids, len(self.out))

    def result(self, reason: FinishReason) -> Result:
        return Result(
            fake_text(self.out), tuple(self.out), Usage(len(self.request.input_ids), len(self.out)), reason
        )


@dataclass(frozen=True)
class FakeCall:
    rows: int
    max_new_tokens: tuple[int, ...]
    steps: int
    finish_reasons: tuple[FinishReason, ...]


class FakeEngine:
    """Thread-safe bookkeeping; one call at a time is what the serving layer promises, and
    ``concurrent_calls_seen`` lets a test check that promise."""

    def __init__(
        self,
        *,
        step_delay_s: float = 0.0,
        row_delay_s: float = 0.0,
        fail_when: Callable[[Sequence[GenerationRequest]], bool] | None = None,
        max_input_length: int = 64,
        gate: threading.Event | None = None,
        contrastive_max_rows: int = 1_000,
        greedy_continuous: bool = False,
    ) -> None:
        self.manifest = FAKE_MANIFEST
        self._greedy_continuous = greedy_continuous
        self.step_delay_s = step_delay_s
        self.row_delay_s = row_delay_s
        self.fail_when = fail_when
        self.max_input_length = max_input_length
        # While a gate is given and not set, every call blocks after it started: tests use it to
        # hold jobs "running" (and the rest "queued") for as long as they need.
        self.gate = gate
        self.contrastive_max_rows = contrastive_max_rows  # add() past it: Overloaded, as the real one
        self.calls: list[FakeCall] = []
        self.contrastive_steps: list[int] = []  # rows per contrastive step
        self._lock = threading.Lock()
        self._in_call = 0
        self.concurrent_calls_seen = 0
        self.started = threading.Event()  # set when any call starts (tests wait for "running")

    def tokenize(self, prompts: Sequence[str]) -> list[tuple[int, ...]]:
        out = []
        for i, prompt in enumerate(prompts):
            ids = fake_tokenize(prompt)
            if len(ids) > self.max_input_length:
                raise PromptTooLong(
                    f"prompt {i} has {len(ids)} tokens, {len(ids) - self.max_input_length} more than "
                    f"the model's limit of {self.max_input_length}; shorten it"
                )
            out.append(ids)
        return out

    def _enter(self) -> None:
        with self._lock:
            self._in_call += 1
            self.concurrent_calls_seen = max(self.concurrent_calls_seen, self._in_call)
        self.started.set()
        if self.gate is not None and not self.gate.wait(timeout=60):
            raise RuntimeError("fake engine gate was never opened")

    def _leave(self) -> None:
        with self._lock:
            self._in_call -= 1

    def _sleep(self, rows: int) -> None:
        delay = self.step_delay_s + self.row_delay_s * rows
        if delay > 0:
            time.sleep(delay)

    def generate_requests(
        self, requests: Sequence[GenerationRequest], on_token: OnToken | None = None
    ) -> list[Result]:
        self._enter()
        try:
            if self.fail_when is not None and self.fail_when(requests):
                raise RuntimeError("fake engine failure")
            rows = [_Row(r) for r in requests]
            results: list[Result | None] = [None] * len(rows)
            steps = 0
            while any(r is None for r in results):
                self._sleep(sum(r is None for r in results))  # finished rows drop out, as in CTranslate2
                steps += 1
                for i, row in enumerate(rows):
                    if results[i] is not None:
                        continue
                    tok = row.next_token()
                    if tok is None:
                        results[i] = row.result(FinishReason.EOS)
                        continue
                    row.out.append(tok)
                    if on_token is not None and on_token(i, tok):
                        results[i] = row.result(FinishReason.CANCELLED)
                    elif len(row.out) >= row.request.params.max_new_tokens:
                        results[i] = row.result(FinishReason.LENGTH)
            done = [r for r in results if r is not None]
            with self._lock:
                self.calls.append(
                    FakeCall(
                        len(rows),
                        tuple(r.params.max_new_tokens for r in requests),
                        steps,
                        tuple(r.finish_reason for r in done),
                    )
                )
            return done
        finally:
            self._leave()

    def greedy_continuous(self) -> bool:
        return self._greedy_continuous

    def decoder_batch(self) -> FakeDecoderBatch:
        return FakeDecoderBatch(self)


class FakeDecoderBatch:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.rows: dict[str, _Row] = {}
        self._cancelled: set[str] = set()

    def add(self, request_id: str, request: GenerationRequest) -> None:
        if request_id in self.rows:
            raise InvalidRequest(f"request id {request_id!r} is already in the batch")
        if REJECT_ID in request.input_ids:
            raise InvalidRequest("the fake contrastive decoder refuses this request")
        if len(self.rows) >= self.engine.contrastive_max_rows:
            raise Overloaded(f"the contrastive batch is full ({len(self.rows)} rows)")
        self.rows[request_id] = _Row(request)

    def cancel(self, request_id: str) -> None:
        if request_id in self.rows:
            self._cancelled.add(request_id)

    def __len__(self) -> int:
        return len(self.rows)

    def step(self) -> list[TokenEvent]:
        engine = self.engine
        engine._enter()
        try:
            if engine.fail_when is not None and engine.fail_when([r.request for r in self.rows.values()]):
                raise RuntimeError("fake engine failure")
            engine._sleep(len(self.rows))
            with engine._lock:
                engine.contrastive_steps.append(len(self.rows))
            events = []
            for rid, row in list(self.rows.items()):
                if rid in self._cancelled:
                    events.append(TokenEvent(rid, -1, row.result(FinishReason.CANCELLED)))
                    del self.rows[rid]
                    continue
                tok = row.next_token()
                if tok is None:
                    events.append(TokenEvent(rid, -1, row.result(FinishReason.EOS)))
                    del self.rows[rid]
                    continue
                row.out.append(tok)
                if len(row.out) >= row.request.params.max_new_tokens:
                    events.append(TokenEvent(rid, tok, row.result(FinishReason.LENGTH)))
                    del self.rows[rid]
                else:
                    events.append(TokenEvent(rid, tok))
            self._cancelled &= set(self.rows)
            return events
        finally:
            engine._leave()
