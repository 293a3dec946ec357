"""Job.with_status copies a job exactly as dataclasses.replace would, without its cost."""

from __future__ import annotations

import dataclasses

import pytest

from engine.runtime.params import DecodingParams
from engine.serving.jobs import Job, JobError, JobStatus


def test_with_status_is_replace_and_leaves_the_original_alone() -> None:
    job = Job(id="j", owner="o", prompts=("a", "b"), params=DecodingParams(max_new_tokens=5), created_at=1.0)
    running = job.with_status(JobStatus.RUNNING, started_at=2.0, attempts=1)
    assert running == dataclasses.replace(job, status=JobStatus.RUNNING, started_at=2.0, attempts=1)
    assert hash(running) == hash(dataclasses.replace(running))
    assert job.status is JobStatus.QUEUED and job.started_at is None and job.attempts == 0
    failed = running.with_status(JobStatus.FAILED, finished_at=3.0, error=JobError("timeout", "late"))
    assert failed.error == JobError("timeout", "late") and running.error is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        failed.status = JobStatus.QUEUED  # type: ignore[misc]
    with pytest.raises(TypeError, match="no_such_field"):
        job.with_status(JobStatus.RUNNING, no_such_field=1)
