"""The decoding strategies: one row each in ``STRATEGIES``, the only table that names them.

A row says how the strategy is recognised from a request's parameters, which parameters must match
for two requests to share a call, how our decoder runs it (a chooser, engine/runtime/choosers.py)
and how CTranslate2 runs it (its ``translate_batch`` options); either may be ``None``: that backend
cannot run it. Everything else reads this table: ``DecodingParams.strategy`` and ``batch_key``,
``chooser_for``, the backends each strategy runs on (backends.py), CTranslate2's options (ct2.py).

Adding a strategy: its chooser class (choosers.py, or a module of its own), a ``Strategy`` member
(params.py: the name stored with queued jobs) and its row here, in order of precedence.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.errors import InvalidRequest
from engine.runtime.choosers import Chooser, Contrastive, Greedy, Sampling
from engine.runtime.params import DecodingParams, Strategy


@dataclass(frozen=True)
class StrategySpec:
    strategy: Strategy
    # Whether a request's parameters ask for it; rows are tried in table order, the first wins.
    recognise: Callable[[DecodingParams], bool]
    # DecodingParams fields (besides those every strategy shares) that must be equal for requests
    # to share one engine call; the fields a strategy ignores are left out.
    batch_fields: tuple[str, ...] = ()
    # A shared call decodes to its group's largest max_new_tokens and stops the other rows at their
    # own: exact unless the limit changes the outcome (beam search: which hypotheses finish), in
    # which case requests of different lengths need calls of their own.
    split_by_length: bool = False
    # Our decoder's chooser class for a row (None: our decoder does not run it).
    chooser: type[Chooser] | None = None
    # CTranslate2's translate_batch options for it (None: CTranslate2 does not run it).
    ct2_options: Callable[[DecodingParams], dict[str, Any]] | None = None
    # Parameters that CTranslate2 cannot honour although it runs the strategy.
    decoder_only: Callable[[DecodingParams], bool] | None = None

    @property
    def needs_hidden(self) -> bool:
        """Whether our decoder scores the candidates by their hidden states (the chooser says)."""
        return self.chooser is not None and self.chooser.needs_hidden


# Mirrors transformers' GenerationConfig.get_generation_mode (4.55) in its order of precedence.
STRATEGIES: tuple[StrategySpec, ...] = (
    StrategySpec(
        Strategy.BEAM,
        recognise=lambda p: p.num_beams > 1,
        batch_fields=("num_beams", "length_penalty"),
        split_by_length=True,
        ct2_options=lambda p: {"beam_size": p.num_beams, "length_penalty": p.length_penalty},
    ),
    StrategySpec(
        Strategy.SAMPLE,
        recognise=lambda p: p.do_sample,
        batch_fields=("top_k", "top_p", "temperature", "seed"),
        chooser=Sampling,
        # Transformers' top_k=0 means "no top-k filter"; CTranslate2's 0 means the same.
        ct2_options=lambda p: {
            "sampling_topk": p.top_k,
            "sampling_topp": p.top_p,
            "sampling_temperature": p.temperature,
        },
        # CTranslate2 seeds each worker thread once, so a request cannot have its own generator.
        decoder_only=lambda p: p.seed is not None,
    ),
    StrategySpec(
        Strategy.CONTRASTIVE,
        recognise=lambda p: p.penalty_alpha > 0 and p.top_k > 1,
        # CTranslate2 has no hidden states and no step-level API.
        chooser=Contrastive,
    ),
    StrategySpec(
        Strategy.GREEDY,
        recognise=lambda p: True,
        chooser=Greedy,
        ct2_options=lambda p: {},
    ),
)

SPECS: dict[Strategy, StrategySpec] = {s.strategy: s for s in STRATEGIES}

# Which strategies our decoder runs, and how (None: CTranslate2 only): a view of the table.
CHOOSERS: dict[Strategy, type[Chooser] | None] = {s.strategy: s.chooser for s in STRATEGIES}


def spec_of(params: DecodingParams) -> StrategySpec:
    """The row of the strategy these parameters ask for."""
    return next(s for s in STRATEGIES if s.recognise(params))


def chooser_for(params: DecodingParams, eos_token_id: int, draw_index: int = 0) -> Chooser:
    """The chooser of a request's row; ``draw_index``: which prompt of its request it is."""
    chooser = spec_of(params).chooser
    if chooser is None:
        runs = ", ".join(s.value for s in Strategy if SPECS[s].chooser is not None)
        raise InvalidRequest(f"our decoder runs {runs}, not {params.strategy.value}")
    return chooser.for_request(params, eos_token_id, draw_index)
