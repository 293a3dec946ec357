"""Stop sequences: a row ends at the first place its decoded text shows one of its strings.

Matching is on text, not ids: a stop string may span several tokens, or end inside one. After each
new token the row's text so far is searched; the first token whose text shows a match ends the
row. Its ``token_ids`` are the ids up to and including that token (a prefix of what the row would
have produced without stop sequences), its text is cut before the earliest match, and its finish
reason is ``FinishReason.STOP``. As in Transformers (``stop_strings``), a stop sequence ends a row
whatever ``min_new_tokens`` says: that parameter only holds back the EOS.

The cost per token does not grow with the row: its text is decoded incrementally
(engine/runtime/detokenize.py: always equal to decoding every id), and only the end of the text
that the new token can have completed a match in is searched (no match lies wholly in the text
already searched, or the row would have stopped there).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from engine.runtime.detokenize import Decode, IncrementalText

# ids -> text: the model's tokenizer (Tokenizer.decode).
Detokenize = Decode


@dataclass(frozen=True)
class StopCut:
    """Where a row stopped: its first ``tokens`` ids, and their text cut before the match."""

    tokens: int
    text: str


class StopSequences:
    """One row's stop strings (non-empty, as ``DecodingParams`` validates them) and the text of
    its ids so far: one object per row."""

    def __init__(self, strings: tuple[str, ...], detokenize: Detokenize) -> None:
        self.strings = strings
        self.detokenize = detokenize
        self._longest = max(len(s) for s in strings)
        self._text = IncrementalText(detokenize)
        self._clean = 0  # the text's first _clean characters show no match
        self._row: Sequence[int] | None = None  # the ids of the last check

    def check(self, ids: Sequence[int]) -> StopCut | None:
        """Called after each new id with the row's ids so far: the cut if their text shows a
        match. The engine passes the one list it appends the row's ids to, which is taken as
        grown since the last call; other ids are compared with the last call's, and decoded
        again from the start unless they extend them."""
        known = self._text.ids
        if ids is not self._row or len(ids) < len(known):
            if len(ids) < len(known) or list(ids[: len(known)]) != known:
                self._text, self._clean = IncrementalText(self.detokenize), 0
                known = self._text.ids
            self._row = ids
        for token_id in ids[len(known) :]:
            self._push(token_id)
        return self._search()

    def first(self, ids: Sequence[int]) -> StopCut | None:
        """The cut of finished ids (beam search, which cannot stop early): the shortest prefix
        whose text shows a match, as if ``check`` had run after every id."""
        row = StopSequences(self.strings, self.detokenize)
        for token_id in ids:
            row._push(token_id)
            cut = row._search()
            if cut is not None:
                return cut
        return None

    def _push(self, token_id: int) -> None:
        self._text.push(token_id)
        if not self._text.appended:  # earlier text changed: search it all again
            self._clean = 0

    def _search(self) -> StopCut | None:
        text = self._text.text
        # A match in text that was not clean ends past it, so it starts at most (longest - 1)
        # characters before the clean text's end: searching from there finds the earliest match
        # of the whole text, since none lies wholly in the clean text.
        start = max(0, self._clean - self._longest + 1)
        found = [i for i in (text.find(s, start) for s in self.strings) if i >= 0]
        if not found:
            self._clean = len(text)
            return None
        return StopCut(len(self._text.ids), text[: min(found)])


def stop_sequences(strings: tuple[str, ...], detokenize: Detokenize) -> StopSequences | None:
    return StopSequences(strings, detokenize) if strings else None
