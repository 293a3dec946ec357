"""Incremental detokenization: the text each new token adds to one prompt's completion.

Sentencepiece text is not a sum of per-token strings: a piece's leading "▁" is a space except at
the start, a character outside the vocabulary arrives as several byte pieces (only the last one
completes it), and stop sequences may cut the text in the middle of a token. ``TextDeltas``
therefore keeps the text of the ids so far (``IncrementalText``: a few ids decoded per new one,
always equal to decoding them all) and releases only the part of that text that can no longer
change: never a trailing replacement character (bytes waiting for their next piece), never a
suffix that could still grow into a stop sequence, never anything from a stop sequence on. When
the prompt ends, ``finish`` releases what is left of the final text (the engine's ``Result.text``,
already cut before a stop sequence). The concatenated deltas equal the final text exactly: every
delta extends what was sent, and ``finish`` sends the rest of the final text.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.runtime.detokenize import Decode, IncrementalText

__all__ = ["Decode", "TextDeltas"]

REPLACEMENT = "\ufffd"


class TextDeltas:
    def __init__(self, decode: Decode, stop: Sequence[str] = ()) -> None:
        self._text = IncrementalText(decode)
        self._stop = tuple(s for s in stop if s)
        self._sent = ""

    @property
    def sent(self) -> str:
        """What the deltas so far add up to."""
        return self._sent

    def push(self, token_id: int) -> str:
        """The text ``token_id`` adds (may be "": the text it starts is not settled yet)."""
        text = self._text.push(token_id)
        if not text.startswith(self._sent):
            return ""  # an earlier character is still changing (byte pieces): wait
        return self._release(text)

    def finish(self, final_text: str) -> str:
        """The rest of the prompt's final text. Called once, with the engine's final text."""
        if not final_text.startswith(self._sent):
            # Only a final text that disagrees with the tokens streamed so far gets here (it is
            # not their decoding): nothing sent can be taken back, so send nothing more.
            return ""
        delta, self._sent = final_text[len(self._sent) :], final_text
        return delta

    def _release(self, text: str) -> str:
        end = len(text)
        while end > len(self._sent) and text[end - 1] == REPLACEMENT:
            end -= 1  # bytes of a character whose last byte comes with a later token
        if self._stop:
            end = min(end, self._stop_safe_end(text, end))
        if end <= len(self._sent):
            return ""
        delta, self._sent = text[len(self._sent) : end], text[:end]
        return delta

    def _stop_safe_end(self, text: str, end: int) -> int:
        """Where text that cannot be part of a stop sequence ends: before the first complete
        match, else before the longest tail that is the start of a stop sequence."""
        longest = max(len(s) for s in self._stop)
        start = max(0, len(self._sent) - longest + 1)
        window = text[:end]
        matches = [i for i in (window.find(s, start) for s in self._stop) if i >= 0]
        if matches:
            return min(matches)
        for keep in range(min(longest - 1, end - len(self._sent)), 0, -1):
            tail = window[end - keep :]
            if any(s.startswith(tail) for s in self._stop):
                return end - keep
        return end
