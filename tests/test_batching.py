"""The batching policy alone: a pure function of the queue and a clock reading."""

from __future__ import annotations

from engine.runtime.params import DecodingParams
from engine.serving.batching import (
    BatchLimits,
    DispatchReason,
    Lane,
    QueueEntry,
    batch_key_text,
    lane_of,
    plan_batch,
)

GREEDY = batch_key_text(DecodingParams())
BEAM = batch_key_text(DecodingParams(num_beams=4))
LIMITS = BatchLimits(max_batch_size=8, max_batch_tokens=10_000, max_queue_delay_s=0.010)
T0 = 1000.0


def entry(
    n: int,
    at: float = T0,
    key: str = GREEDY,
    prompts: int = 1,
    prompt_tokens: int = 10,
    new: int = 32,
    lane: Lane = Lane.BATCH,
) -> QueueEntry:
    return QueueEntry(f"j{n}", n, at, lane, key, prompts, prompt_tokens, new)


def test_empty_queue_waits_for_work() -> None:
    d = plan_batch([], T0, LIMITS)
    assert d.reason is DispatchReason.EMPTY and not d.dispatch


def test_full_batch_dispatches_at_once() -> None:
    queue = [entry(i) for i in range(10)]
    d = plan_batch(queue, T0, LIMITS)  # no time has passed
    assert d.reason is DispatchReason.FULL
    assert d.job_ids == tuple(f"j{i}" for i in range(8))
    assert d.num_prompts == 8


def test_partial_batch_waits_then_goes_when_the_delay_expires() -> None:
    queue = [entry(0, at=T0), entry(1, at=T0 + 0.004)]
    d = plan_batch(queue, T0 + 0.004, LIMITS)
    assert d.reason is DispatchReason.WAIT and not d.dispatch
    assert abs(d.wait_s - 0.006) < 1e-9  # measured from the oldest job, not the newest
    d = plan_batch(queue, T0 + 0.010, LIMITS)
    assert d.reason is DispatchReason.DELAY_EXPIRED
    assert d.job_ids == ("j0", "j1")


def test_zero_delay_dispatches_whatever_is_there() -> None:
    limits = BatchLimits(max_batch_size=8, max_batch_tokens=10_000, max_queue_delay_s=0.0)
    d = plan_batch([entry(0)], T0, limits)
    assert d.reason is DispatchReason.DELAY_EXPIRED and d.job_ids == ("j0",)


def test_only_jobs_with_the_heads_batch_key_join() -> None:
    queue = [entry(0), entry(1, key=BEAM), entry(2), entry(3, key=BEAM)]
    d = plan_batch(queue, T0 + 1, LIMITS)
    assert d.job_ids == ("j0", "j2")
    # The head defines the group: a beam job at the head runs with the other beam job.
    d = plan_batch(queue[1:], T0 + 1, LIMITS)
    assert d.job_ids == ("j1", "j3")


def test_batch_keys_follow_decoding_params() -> None:
    assert batch_key_text(DecodingParams(top_k=5)) == GREEDY  # greedy ignores top_k
    assert batch_key_text(DecodingParams(max_new_tokens=5)) == GREEDY  # length is the policy's business
    assert batch_key_text(DecodingParams(do_sample=True, temperature=0.5)) != batch_key_text(
        DecodingParams(do_sample=True, temperature=0.7)
    )
    assert lane_of(DecodingParams(penalty_alpha=0.6, top_k=4)) is Lane.DECODER
    assert lane_of(DecodingParams(num_beams=2)) is Lane.BATCH
    # A seeded draw needs a generator of its own: our decoder's lane; unseeded sampling batches.
    assert lane_of(DecodingParams(do_sample=True, seed=3)) is Lane.DECODER
    assert lane_of(DecodingParams(do_sample=True)) is Lane.BATCH
    # Greedy (with its processors) takes the continuous lane only where the server says so;
    # beam search and unseeded sampling stay on the batch lane either way.
    greedy = DecodingParams(repetition_penalty=1.2, no_repeat_ngram_size=3)
    assert lane_of(greedy) is Lane.BATCH
    assert lane_of(greedy, greedy_continuous=True) is Lane.DECODER
    assert lane_of(DecodingParams(num_beams=2), greedy_continuous=True) is Lane.BATCH
    assert lane_of(DecodingParams(do_sample=True), greedy_continuous=True) is Lane.BATCH


def test_a_job_counts_each_of_its_prompts() -> None:
    queue = [entry(0, prompts=5), entry(1, prompts=2), entry(2, prompts=3), entry(3, prompts=1)]
    d = plan_batch(queue, T0, LIMITS)
    # 5 + 2 = 7; the 3-prompt job does not fit, so the batch is full and goes now.
    assert d.reason is DispatchReason.FULL
    assert d.job_ids == ("j0", "j1") and d.num_prompts == 7


def test_token_budget_bounds_the_batch() -> None:
    limits = BatchLimits(max_batch_size=32, max_batch_tokens=200, max_queue_delay_s=0.010)
    queue = [entry(i, prompt_tokens=18, new=32) for i in range(6)]  # 50 tokens each
    d = plan_batch(queue, T0, limits)
    assert d.reason is DispatchReason.FULL
    assert d.job_ids == ("j0", "j1", "j2", "j3") and d.tokens == 200


def test_a_head_over_every_limit_still_runs_alone() -> None:
    limits = BatchLimits(max_batch_size=4, max_batch_tokens=100, max_queue_delay_s=0.010)
    d = plan_batch([entry(0, prompts=10, prompt_tokens=500), entry(1)], T0, limits)
    assert d.reason is DispatchReason.FULL and d.job_ids == ("j0",)


def test_no_starvation_an_odd_job_at_the_head_runs_within_the_delay() -> None:
    # One sampling job ahead of a stream of greedy jobs: it is the head, so it is dispatched once
    # its delay expires, and the greedy jobs cannot overtake it.
    odd = batch_key_text(DecodingParams(do_sample=True, seed=3))
    queue = [entry(0, key=odd), *(entry(i, at=T0 + 0.001 * i) for i in range(1, 40))]
    assert plan_batch(queue, T0 + 0.005, LIMITS).reason is DispatchReason.WAIT
    d = plan_batch(queue, T0 + 0.010, LIMITS)
    assert d.job_ids == ("j0",)


def test_lengths_far_from_the_heads_wait_for_their_own_batch() -> None:
    queue = [entry(0, new=16), entry(1, new=256), entry(2, new=32), entry(3, new=8), entry(4, new=4)]
    d = plan_batch(queue, T0 + 1, LIMITS)
    assert d.job_ids == ("j0", "j2", "j3")  # within a factor 2 of 16
    anything = BatchLimits(8, 10_000, 0.010, max_new_tokens_ratio=0)
    assert plan_batch(queue, T0 + 1, anything).job_ids == ("j0", "j1", "j2", "j3", "j4")


def test_contrastive_entries_never_join_a_batch_lane_head() -> None:
    queue = [entry(0), entry(1, lane=Lane.DECODER)]
    assert plan_batch(queue, T0 + 1, LIMITS).job_ids == ("j0",)
