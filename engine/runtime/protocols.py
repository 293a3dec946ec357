"""What the serving layer needs from the runtime. ``engine.runtime.engine.Engine`` implements it;
tests of the scheduler use fakes that implement the same protocols."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from engine.model.manifest import Manifest
from engine.runtime.result import GenerationRequest, Result, TokenEvent

# Called with (index of the request in the batch, new token id); returning True stops that request.
OnToken = Callable[[int, int], bool | None]


class DecoderBatchLike(Protocol):
    """Our decoder's continuous batch: requests join and leave between decoder steps."""

    def add(self, request_id: str, request: GenerationRequest) -> None: ...

    def cancel(self, request_id: str) -> None:
        """The request leaves at the next step; that step reports it with a CANCELLED result."""

    def step(self) -> list[TokenEvent]:
        """One decoder step for every active request."""
        ...

    def __len__(self) -> int: ...


class EngineLike(Protocol):
    manifest: Manifest

    def tokenize(self, prompts: Sequence[str]) -> list[tuple[int, ...]]:
        """Input ids (sentencepiece + EOS). Raises PromptTooLong saying by how much."""
        ...

    def generate_requests(
        self, requests: Sequence[GenerationRequest], on_token: OnToken | None = None
    ) -> list[Result]:
        """One batched call. Requests may mix strategies; the engine groups them by batch_key."""
        ...

    def greedy_continuous(self) -> bool:
        """Whether greedy runs on our decoder's continuous batch by default here (measured)."""
        ...

    def decoder_batch(self) -> DecoderBatchLike:
        """A new continuous batch on our decoder (for requests whose backend it is)."""
        ...
