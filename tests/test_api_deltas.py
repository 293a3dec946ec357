"""Incremental detokenization (engine/api/deltas.py): the deltas add up to the final text exactly,
with byte pieces, words split over tokens and stop sequences, on a real sentencepiece model."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from engine.api.deltas import TextDeltas
from engine.model.tokenizer import Tokenizer

# A toy vocabulary of byte strings: "é" is two UTF-8 bytes, each its own token; "✓" is three.
PIECES = {1: b"ab", 2: b" cd", 3: "é".encode()[:1], 4: "é".encode()[1:], 5: b"E", 6: b"N", 7: b"D", 8: b"x"}
PIECES.update({9: "✓".encode()[:1], 10: "✓".encode()[1:2], 11: "✓".encode()[2:], 12: b"qENDz"})


def byte_decode(ids: Sequence[int]) -> str:
    return b"".join(PIECES[i] for i in ids).decode("utf-8", errors="replace")


def run(ids: Sequence[int], stop: Sequence[str] = (), final: str | None = None) -> list[str]:
    deltas = TextDeltas(byte_decode, stop)
    out = [deltas.push(i) for i in ids]
    out.append(deltas.finish(byte_decode(ids) if final is None else final))
    return out


def test_a_character_split_over_byte_tokens_comes_whole_with_its_last_byte() -> None:
    assert run([1, 3, 4, 2]) == ["ab", "", "é", " cd", ""]
    assert run([9, 10, 11]) == ["", "", "✓", ""]


def test_text_that_could_start_a_stop_sequence_waits() -> None:
    # "E", "N" could be the start of "END": held back; "x" shows it was not.
    assert run([1, 5, 6, 8], stop=["END"]) == ["ab", "", "", "ENx", ""]
    # The engine cut its text before "END": nothing of it was ever sent.
    assert run([1, 5, 6, 7], stop=["END"], final="ab") == ["ab", "", "", "", ""]
    # A match inside one token's text: only the part before it is sent.
    assert run([1, 12], stop=["END"], final="abq") == ["ab", "q", ""]


def test_a_held_back_tail_comes_with_finish_when_no_stop_followed() -> None:
    assert run([1, 5, 6], stop=["END"]) == ["ab", "", "", "EN"]


@pytest.fixture(scope="module")
def tokenizer(flan_model_dir: Path) -> Tokenizer:
    return Tokenizer(flan_model_dir / "spiece.model")


@pytest.mark.parametrize("stop", [(), ("e",), ("the ", "s t")])
def test_random_token_streams_add_up_to_their_text(tokenizer: Tokenizer, stop: tuple[str, ...]) -> None:
    """Random ids (byte pieces, word pieces, specials) as a random-weight model emits them: the
    deltas are always a prefix of the final text, and with finish they are all of it."""
    rng = np.random.default_rng(0)
    size = tokenizer.sp_vocab_size
    for _ in range(200):
        ids = [int(i) for i in rng.integers(0, size + 4, size=int(rng.integers(1, 40)))]
        text = tokenizer.decode(ids)
        final = text
        for s in stop:
            at = final.find(s)
            if at >= 0:
                final = final[:at]
        deltas = TextDeltas(tokenizer.decode, stop)
        sent = ""
        for i in ids:
            sent += deltas.push(i)
            assert final.startswith(sent), (ids, sent)
        assert sent + deltas.finish(final) == final, ids
