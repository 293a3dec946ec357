"""The tokenizer: T5's conventions, the demo tokenizer's provenance, and agreement with Transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import sentencepiece as spm

from engine.errors import ModelError
from engine.model.demo import DEMO_CORPUS, DEMO_SPIECE, EXTRA_IDS, train_demo_tokenizer
from engine.model.tokenizer import Tokenizer

TEXTS = [
    "Translate to German: the house is wonderful.",
    "Return the first release in which this feature was recognized.",
    "Q: What is 12 + 30? A:",
    "hi",
    "",
    "Summarize: A file object is returned, and the socket is closed when the file is garbage collected.",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(DEMO_SPIECE)


@pytest.fixture(scope="module")
def sp() -> spm.SentencePieceProcessor:
    proc = spm.SentencePieceProcessor()
    proc.Load(str(DEMO_SPIECE))
    return proc


def test_special_ids_are_t5s(sp: spm.SentencePieceProcessor) -> None:
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
    assert [sp.IdToPiece(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]
    assert sp.GetPieceSize() >= 2000


def test_input_ids_are_pieces_then_eos(tok: Tokenizer, sp: spm.SentencePieceProcessor) -> None:
    for text in TEXTS:
        assert tok.encode(text) == [*sp.EncodeAsIds(text), 1]
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
    assert tok.encode("") == [1]


def test_round_trip(tok: Tokenizer) -> None:
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text


def test_decode_skips_specials_and_sentinels(tok: Tokenizer) -> None:
    ids = tok.encode("the house")
    sentinel = tok.sp_vocab_size + 5  # an <extra_id_N>
    padding_row = 32127  # past the sentinels, inside the model's 32128 vocabulary
    assert tok.decode([0, *ids, sentinel, padding_row, 1, 0]) == "the house"


def test_unknown_characters_map_to_unk(tok: Tokenizer) -> None:
    assert 2 in tok.encode("漢字")


def test_missing_or_corrupt_file_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        Tokenizer(tmp_path / "nope.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ModelError, match="not a sentencepiece model"):
        Tokenizer(bad)


def test_shipped_tokenizer_is_rebuilt_from_shipped_corpus(tmp_path: Path) -> None:
    """scripts/build_demo_tokenizer.py's training reproduces the shipped spiece model byte for byte."""
    rebuilt = train_demo_tokenizer(DEMO_CORPUS, tmp_path / "spiece.model")
    assert rebuilt.read_bytes() == DEMO_SPIECE.read_bytes()


def test_same_ids_as_transformers_t5_tokenizer(tok: Tokenizer, flan_hf_dir: Path) -> None:
    from transformers import AutoTokenizer, T5Tokenizer

    texts = [t for t in TEXTS if t]
    slow = T5Tokenizer.from_pretrained(flan_hf_dir)
    fast = AutoTokenizer.from_pretrained(flan_hf_dir)
    ours = tok.encode_batch(texts)
    assert [slow(t).input_ids for t in texts] == ours
    assert [fast(t).input_ids for t in texts] == ours
    # T5's vocabulary: pieces, then 100 sentinels with <extra_id_0> highest, as in FLAN-T5.
    assert len(slow) == tok.sp_vocab_size + EXTRA_IDS
    assert slow.convert_tokens_to_ids("<extra_id_0>") == tok.sp_vocab_size + EXTRA_IDS - 1
    generated = [*ours[0][:-1], slow.convert_tokens_to_ids("<extra_id_3>"), 1]
    assert tok.decode(generated) == slow.decode(generated, skip_special_tokens=True)
