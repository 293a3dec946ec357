"""Stop sequences: a row ends at the first place its decoded text shows one of its strings.

Matching is on text, not ids: a stop string may span several tokens, or end inside one. After each
new token the row's text so far is decoded and searched; the first token whose text shows a match
ends the row. Its ``token_ids`` are the ids up to and including that token (a prefix of what the
row would have produced without stop sequences), its text is cut before the earliest match, and
its finish reason is ``FinishReason.STOP``. As in Transformers (``stop_strings``), a stop sequence
ends a row whatever ``min_new_tokens`` says: that parameter only holds back the EOS.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

# ids -> text: the model's tokenizer (Tokenizer.decode).
Detokenize = Callable[[Sequence[int]], str]


@dataclass(frozen=True)
class StopCut:
    """Where a row stopped: its first ``tokens`` ids, and their text cut before the match."""

    tokens: int
    text: str


@dataclass(frozen=True)
class StopSequences:
    """One row's stop strings (non-empty, as ``DecodingParams`` validates them)."""

    strings: tuple[str, ...]
    detokenize: Detokenize

    def check(self, ids: Sequence[int]) -> StopCut | None:
        """Called after each new id with the row's ids so far: the cut if the text shows a match."""
        text = self.detokenize(ids)
        found = [i for i in (text.find(s) for s in self.strings) if i >= 0]
        return StopCut(len(ids), text[: min(found)]) if found else None

    def first(self, ids: Sequence[int]) -> StopCut | None:
        """The cut of finished ids (beam search, which cannot stop early): the shortest prefix
        whose text shows a match, as if ``check`` had run after every id."""
        for n in range(1, len(ids) + 1):
            cut = self.check(ids[:n])
            if cut is not None:
                return cut
        return None


def stop_sequences(strings: tuple[str, ...], detokenize: Detokenize) -> StopSequences | None:
    return StopSequences(strings, detokenize) if strings else None
