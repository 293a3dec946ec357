"""The incremental stop check (engine/runtime/stop.py, engine/runtime/detokenize.py) against the
definition: decode the whole row after every id and search it (``expected_cut`` in
tests/test_stop.py). Many random rows of the tests' real sentencepiece tokenizer, with specials,
ids past its vocabulary and runs of bare "▁" pieces among them, and stop strings drawn from the
rows' own texts (so they span tokens, end inside one, hold spaces). Also a byte-level decoder whose
characters span several ids (U+FFFD until the last byte), where the window cannot tell."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from engine.model.tokenizer import Tokenizer
from engine.runtime.detokenize import CONTEXT_IDS, IncrementalText
from engine.runtime.stop import StopCut, StopSequences
from tests.test_stop import expected_cut

WORDS = ["the", "cat", "sat", "on", "mat", "über", "naïve", "x", "2026", "a.b", "don't", "(ok)", "zzz"]


@pytest.fixture(scope="module")
def tokenizer(flan_hf_dir: Path) -> Tokenizer:
    return Tokenizer(flan_hf_dir / "spiece.model")


def random_row(rng: random.Random, tok: Tokenizer) -> list[int]:
    """Ids of random words and random pieces, with specials (pad, eos, unk), ids past the
    sentencepiece vocabulary (T5's extra ids) and bare "▁" pieces spliced in."""
    size = tok.sp_vocab_size
    space = tok._sp.PieceToId("\u2581")
    ids: list[int] = []
    while len(ids) < rng.randint(1, 60):
        kind = rng.random()
        if kind < 0.4:
            ids.extend(tok.encode(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3))))[:-1])
        elif kind < 0.7:
            ids.append(rng.randrange(3, size))
        elif kind < 0.8:
            ids.extend([space] * rng.randint(1, 3))
        elif kind < 0.9:
            ids.append(rng.choice([0, 1, 2]))
        else:
            ids.append(rng.randrange(size, size + 100))
    return ids


def stop_strings(rng: random.Random, text: str) -> tuple[str, ...]:
    """One to three strings from ``text`` (any place, 1 to 6 characters) and maybe one that never
    matches."""
    strings: list[str] = []
    for _ in range(rng.randint(1, 3)):
        if not text:
            break
        start = rng.randrange(len(text))
        strings.append(text[start : start + rng.randint(1, 6)])
    if rng.random() < 0.3 or not strings:
        strings.append("\u2603never")
    return tuple(dict.fromkeys(strings))


def incremental_cut(
    decode: Callable[[Sequence[int]], str], ids: Sequence[int], stops: tuple[str, ...]
) -> tuple[tuple[int, ...], str] | None:
    """As the engine checks a row: ``check`` after each new id of one growing list."""
    row = StopSequences(stops, decode)
    so_far: list[int] = []
    for token_id in ids:
        so_far.append(token_id)
        cut = row.check(so_far)
        if cut is not None:
            assert cut.tokens == len(so_far)
            return tuple(so_far), cut.text
    return None


def test_the_incremental_text_is_the_whole_rows_decoding(tokenizer: Tokenizer) -> None:
    rng = random.Random(1)
    for _ in range(400):
        ids = random_row(rng, tokenizer)
        text = IncrementalText(tokenizer.decode)
        for n, token_id in enumerate(ids, start=1):
            assert text.push(token_id) == tokenizer.decode(ids[:n]), ids[:n]


def test_the_incremental_check_stops_where_decoding_the_whole_row_does(tokenizer: Tokenizer) -> None:
    rng = random.Random(2)
    stopped = 0
    for _ in range(600):
        ids = random_row(rng, tokenizer)
        text = tokenizer.decode(ids[: rng.randint(1, len(ids))])
        stops = stop_strings(rng, text)
        want = expected_cut(tokenizer.decode, ids, stops)
        assert incremental_cut(tokenizer.decode, ids, stops) == want, (ids, stops)
        first = StopSequences(stops, tokenizer.decode).first(ids)
        assert (None if first is None else (tuple(ids[: first.tokens]), first.text)) == want, (ids, stops)
        stopped += want is not None
    assert stopped > 300  # most rows meet one of their strings: the cuts were compared


def byte_decode(ids: Sequence[int]) -> str:
    """A byte-level tokenizer: each id a byte of UTF-8 (a character may take up to four ids)."""
    return bytes(ids).decode("utf-8", errors="replace")


def test_characters_that_span_ids_stop_where_decoding_the_whole_row_does() -> None:
    rng = random.Random(3)
    alphabet = "ab €éñ漢字😀"
    for _ in range(400):
        row_text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 20)))
        ids = list(row_text.encode())
        if rng.random() < 0.3:  # a stray byte that completes nothing
            ids.insert(rng.randrange(len(ids) + 1), rng.choice([0x80, 0xE2, 0xF0]))
        text = IncrementalText(byte_decode)
        for n, token_id in enumerate(ids, start=1):
            assert text.push(token_id) == byte_decode(ids[:n])
        stops = stop_strings(rng, byte_decode(ids))
        want = expected_cut(byte_decode, ids, stops)
        assert incremental_cut(byte_decode, ids, stops) == want, (ids, stops)
        first = StopSequences(stops, byte_decode).first(ids)
        assert (None if first is None else (tuple(ids[: first.tokens]), first.text)) == want


def test_check_decodes_every_id_once_and_only_a_window() -> None:
    """The cost: each check decodes a window of a few ids, however long the row (not the row)."""
    decoded: list[int] = []

    def counting(ids: Sequence[int]) -> str:
        decoded.append(len(ids))
        return " ".join(f"w{i}" for i in ids)

    row = StopSequences(("never",), counting)
    ids: list[int] = []
    for n in range(500):
        ids.append(n)
        decoded.clear()
        assert row.check(ids) is None
        assert max(decoded) <= 2 * CONTEXT_IDS + 1, (n, decoded)


def test_check_starts_over_on_ids_that_do_not_extend_the_last_ones() -> None:
    decode = byte_decode
    row = StopSequences(("bc",), decode)
    assert row.check(list(b"ab")) is None
    cut = row.check(list(b"xbc"))  # another row: decoded from the start
    assert cut is not None and cut.tokens == 3 and cut.text == "x"
    assert row.check(list(b"xbcd")) == StopCut(4, "x")  # past a match: the same cut text
    assert row.check(list(b"q")) is None
