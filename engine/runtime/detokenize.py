"""Incremental detokenization: the text of a growing row of ids, as ``decode(ids)`` gives it, for
the cost of decoding a few ids per new id instead of the whole row (O(n) per row, not O(n^2)).

SentencePiece text is the pieces' text in order, with two exceptions that a window must respect:
a piece's leading "▁" is a space except while nothing visible has been written yet (the decoder
strips leading whitespace), and a character outside the vocabulary may arrive as several byte
pieces (only the last one completes it; until then it reads as U+FFFD). So each new id is decoded
with a few ids before it, reaching back at least to the last id that wrote something visible: the
text it adds is what that window's text gains over the window without it. Where the window cannot
tell (nothing visible yet, or its text without the new id is not a prefix of its text with it: a
character completed across the window), the whole row is decoded instead, which is exact.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

# ids -> text: the model's tokenizer (Tokenizer.decode).
Decode = Callable[[Sequence[int]], str]

CONTEXT_IDS = 4  # at least this many ids are decoded before the new one (a 4-byte character fits)


class IncrementalText:
    """``text`` is always ``decode(ids)``; ``push`` appends one id."""

    def __init__(self, decode: Decode) -> None:
        self._decode = decode
        self.ids: list[int] = []
        self.text = ""
        self.appended = True  # the last push only added text at the end (else it rewrote some)
        self._visible = -1  # index of the last id whose text added a non-whitespace character
        # The window: ids[_start:] (_start <= _visible), moved on by CONTEXT_IDS at a time so that
        # the last push's window text (_window) serves as this push's text without the new id.
        self._start = 0
        self._window: str | None = None  # decode(ids[_start:]) before this push, if known

    def push(self, token_id: int) -> str:
        """Append ``token_id``; returns the new text (``decode`` of every id so far)."""
        ids = self.ids
        ids.append(token_id)
        last = len(ids) - 1
        old = self.text
        added = None
        if self._visible >= 0:
            if last - self._start > 2 * CONTEXT_IDS:
                self._start, self._window = min(self._visible, last - CONTEXT_IDS), None
            before = self._window if self._window is not None else self._decode(ids[self._start : last])
            after = self._decode(ids[self._start :])
            self._window = after
            if before.strip() and after.startswith(before):
                added = after[len(before) :]
        if added is None:
            text = self._decode(ids)
            self.appended = text.startswith(old)
            added = text[len(old) :] if self.appended else text
        else:
            text = old + added
            self.appended = True
        if added.strip():
            self._visible = last
        self.text = text
        return text
