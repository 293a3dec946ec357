"""JobService: the facade every transport calls (see /work/briefs/service-interface.md).

Signatures first so the API layer can code against them; the implementation follows.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from engine.config import Config
from engine.metrics import Metrics
from engine.runtime.params import DecodingParams
from engine.runtime.protocols import EngineLike
from engine.runtime.result import TokenEvent
from engine.serving.clock import Clock
from engine.serving.jobs import JobView
from engine.serving.store.base import JobStore


class JobService:
    """What every transport calls. Async methods run on the event loop; engine calls run in a
    worker thread (one engine call per device at a time)."""

    def __init__(
        self,
        config: Config,
        store: JobStore,
        engine: EngineLike,
        metrics: Metrics | None = None,
        clock: Clock | None = None,
    ) -> None:
        raise NotImplementedError("JobService: signatures only in this commit")

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self, drain_timeout_s: float = 30.0) -> None:
        raise NotImplementedError

    @property
    def ready(self) -> bool:
        raise NotImplementedError

    async def submit(
        self, owner: str, prompts: Sequence[str], params: DecodingParams, model: str | None = None
    ) -> JobView:
        raise NotImplementedError

    async def get(self, owner: str, job_id: str) -> JobView:
        raise NotImplementedError

    async def cancel(self, owner: str, job_id: str) -> JobView:
        raise NotImplementedError

    async def wait(self, owner: str, job_id: str, timeout_s: float | None = None) -> JobView:
        raise NotImplementedError

    def stream(self, owner: str, job_id: str) -> AsyncIterator[TokenEvent]:
        raise NotImplementedError
