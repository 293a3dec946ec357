"""What the job-store tests share (the stores themselves are conftest.py's fixtures)."""

from __future__ import annotations

from engine.serving.batching import lane_of
from engine.serving.jobs import Job
from engine.serving.store.base import QueueLimits, Submission


def submission(
    job: Job, prompt_tokens: int, *, idempotency_key: str | None = None, limits: QueueLimits | None = None
) -> Submission:
    """``job`` to enqueue on the lane its params give without the server's greedy_lane
    (``lane_of(job.params)``): for tests that do not care which lane; a test that does builds its
    ``Submission`` with the lane it means."""
    return Submission(job, prompt_tokens, lane_of(job.params), idempotency_key=idempotency_key, limits=limits)
