"""The dynamic batching policy: a pure function over the queue's head and a clock reading.

Triton-style: a batch is dispatched at once when it is full (by prompts or by tokens), otherwise
the oldest job waits at most ``max_queue_delay_s`` for companions. The head of the queue always
defines the group and always goes in, even alone over a limit, so no job can starve behind others.
Jobs whose ``max_new_tokens`` differ too much from the head's are left for a later batch: an engine
call lasts as long as its longest row, and a short job should not wait for a long one
(``max_new_tokens_ratio``; benchmarks/bench_batcher.py measures the choice).

Fair across API keys: the queue is first put in ``fair_order`` (each key's jobs oldest first, the
keys taking turns, a deficit round robin in prompts), so the head is the next key's oldest job and
a batch fills from every key with work in turn. One key's backlog of 10,000 jobs never makes
another key's job wait behind all of it: it waits for at most one batch (or one free row).
"""

from __future__ import annotations

import enum
import heapq
import json
from collections.abc import Sequence
from dataclasses import dataclass

from engine.runtime.backends import RUNS_ON, Backend, needs_decoder
from engine.runtime.params import DecodingParams, Strategy

# A job joins the head's batch only when its max_new_tokens is within this factor of the head's
# (either way). Chosen from benchmarks/bench_batcher.py's mixed-length run (RESULTS.md): against
# grouping every length it halves short jobs' latency at the same long-job latency and makespan;
# equal lengths only splits the traffic into more, smaller calls and is slower for both.
DEFAULT_MAX_NEW_TOKENS_RATIO = 2.0


# Float time: a wake-up exactly at the deadline must count as expired, not as 1e-12 s early.
_EPSILON_S = 1e-9


class Lane(enum.Enum):
    """Which loop runs a job: one-shot batched engine calls, or our decoder's continuous batch."""

    BATCH = "batch"
    # The stored value dates from when only contrastive search ran there: rows already hold it.
    DECODER = "contrastive"


def lane_of(params: DecodingParams, *, greedy_continuous: bool = False) -> Lane:
    """The loop that runs a job, decided once, when it is queued: our decoder's continuous batch
    for what only it runs (contrastive search, seeded sampling, logprobs) and, with
    ``greedy_continuous`` (the server's ``greedy_lane``), for greedy too; the batch lane's
    one-shot engine calls for the rest (beam search, unseeded sampling)."""
    if needs_decoder(params):
        return Lane.DECODER
    if (
        greedy_continuous
        and params.strategy is Strategy.GREEDY
        and Backend.DECODER in RUNS_ON[Strategy.GREEDY]
    ):
        return Lane.DECODER
    return Lane.BATCH


def batch_key_text(params: DecodingParams) -> str:
    """``params.batch_key()`` as a stable string, so the store can index and compare it."""
    return json.dumps([k.value if isinstance(k, enum.Enum) else k for k in params.batch_key()])


@dataclass(frozen=True)
class QueueEntry:
    """What the policy needs to know about one queued job (the store returns these, oldest first)."""

    job_id: str
    seq: int  # queue order
    enqueued_at: float  # clock time the job was (first) accepted
    lane: Lane
    batch_key: str
    num_prompts: int
    prompt_tokens: int  # over all its prompts
    max_new_tokens: int
    owner: str = ""  # the API key's name: the unit of fairness

    @property
    def cost_tokens(self) -> int:
        """Tokens it holds in a batch: its prompts plus the room for each prompt's new tokens."""
        return self.prompt_tokens + self.num_prompts * self.max_new_tokens


@dataclass(frozen=True)
class BatchLimits:
    max_batch_size: int  # prompts per engine call
    max_batch_tokens: int  # prompt tokens + max_new_tokens per prompt, per engine call
    max_queue_delay_s: float
    max_new_tokens_ratio: float = DEFAULT_MAX_NEW_TOKENS_RATIO  # 0 disables the check

    def compatible_lengths(self, head: int, other: int) -> bool:
        if self.max_new_tokens_ratio <= 0:
            return True
        return max(head, other) <= self.max_new_tokens_ratio * min(head, other)


class DispatchReason(enum.Enum):
    FULL = "full"  # a limit was reached: waiting longer cannot help
    DELAY_EXPIRED = "delay_expired"  # the head waited max_queue_delay
    WAIT = "wait"  # nothing dispatched yet: wait ``wait_s`` (or until a new job arrives)
    EMPTY = "empty"


@dataclass(frozen=True)
class BatchDecision:
    job_ids: tuple[str, ...]  # empty unless dispatching
    reason: DispatchReason
    num_prompts: int = 0
    tokens: int = 0
    wait_s: float = 0.0  # with WAIT: until the head's delay expires

    @property
    def dispatch(self) -> bool:
        return bool(self.job_ids)


def fair_order(queue: Sequence[QueueEntry], after: str | None = None) -> list[QueueEntry]:
    """The queue in the order keys take turns: each owner's jobs stay oldest first, and the next
    job always comes from the owner that has had the fewest prompts so far (deficit round robin in
    prompts, so a key sending 64-prompt jobs does not get 64 times the share of one sending single
    prompts). Ties go to owners in name order, starting with the first one after ``after`` (the
    owner served first last time), so the first place rotates between keys from batch to batch.
    One owner: the queue unchanged (``queue`` must be oldest first)."""
    by_owner: dict[str, list[QueueEntry]] = {}
    for entry in queue:
        by_owner.setdefault(entry.owner, []).append(entry)
    if len(by_owner) <= 1:
        return list(queue)
    names = sorted(by_owner)
    start = 0 if after is None else next((i for i, n in enumerate(names) if n > after), 0)
    rank = {name: (i - start) % len(names) for i, name in enumerate(names)}
    heap = [(0, rank[name], name, 0) for name in names]  # (prompts served, turn, owner, next index)
    heapq.heapify(heap)
    out: list[QueueEntry] = []
    while heap:
        served, turn, name, i = heapq.heappop(heap)
        entry = by_owner[name][i]
        out.append(entry)
        if i + 1 < len(by_owner[name]):
            heapq.heappush(heap, (served + entry.num_prompts, turn, name, i + 1))
    return out


def plan_batch(
    queue: Sequence[QueueEntry], now: float, limits: BatchLimits, after: str | None = None
) -> BatchDecision:
    """Decide what to run now. ``queue`` is ordered oldest first; it is taken in ``fair_order``
    (keys in turn, starting after ``after``), and entries that cannot share the head's engine call
    (another batch key or lane, or a too different length) are skipped. The delay counts from
    the oldest chosen job."""
    if not queue:
        return BatchDecision((), DispatchReason.EMPTY)
    queue = fair_order(queue, after)
    head = queue[0]
    oldest = head.enqueued_at
    chosen = [head.job_id]
    prompts = head.num_prompts
    tokens = head.cost_tokens
    full = prompts >= limits.max_batch_size or tokens >= limits.max_batch_tokens
    for entry in queue[1:]:
        if full:
            break
        if entry.lane is not head.lane or entry.batch_key != head.batch_key:
            continue
        if not limits.compatible_lengths(head.max_new_tokens, entry.max_new_tokens):
            continue
        if (
            prompts + entry.num_prompts > limits.max_batch_size
            or tokens + entry.cost_tokens > limits.max_batch_tokens
        ):
            # A compatible job that does not fit: the batch cannot grow by waiting for it.
            full = True
            break
        chosen.append(entry.job_id)
        oldest = min(oldest, entry.enqueued_at)
        prompts += entry.num_prompts
        tokens += entry.cost_tokens
        full = prompts >= limits.max_batch_size or tokens >= limits.max_batch_tokens
    if full:
        return BatchDecision(tuple(chosen), DispatchReason.FULL, prompts, tokens)
    waited = now - oldest
    if waited + _EPSILON_S >= limits.max_queue_delay_s:
        return BatchDecision(tuple(chosen), DispatchReason.DELAY_EXPIRED, prompts, tokens)
    return BatchDecision((), DispatchReason.WAIT, wait_s=limits.max_queue_delay_s - waited)
