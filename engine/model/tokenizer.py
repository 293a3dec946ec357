"""SentencePiece tokenizer with T5's conventions.

Input ids are the sentencepiece ids of the text followed by EOS, exactly as Transformers'
``T5Tokenizer`` gives them; decoding skips special tokens (pad, eos, unk) the way
``decode(..., skip_special_tokens=True)`` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm

from engine.errors import ModelError


class Tokenizer:
    def __init__(self, model_file: str | Path, *, eos_id: int = 1, pad_id: int = 0) -> None:
        path = Path(model_file)
        if not path.is_file():
            raise ModelError(f"tokenizer file {path} not found")
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(str(path))
        except (OSError, RuntimeError) as exc:
            raise ModelError(f"{path} is not a sentencepiece model: {exc}") from exc
        self.eos_id = eos_id
        self.pad_id = pad_id
        self._special = {pad_id, eos_id, self._sp.unk_id()}

    @property
    def sp_vocab_size(self) -> int:
        """Pieces in the sentencepiece model (the model's vocabulary may be padded beyond it)."""
        return int(self._sp.GetPieceSize())

    def encode(self, text: str) -> list[int]:
        """Sentencepiece ids of ``text`` followed by EOS."""
        return [*self._sp.EncodeAsIds(text), self.eos_id]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # One call per text: sentencepiece's list form starts a thread pool on every call (68 us
        # against 4 us for one short prompt on an idle machine; over 1 ms when the cores are busy
        # with decoding), and the server tokenizes on its event loop.
        return [[*self._sp.EncodeAsIds(text), self.eos_id] for text in texts]

    def piece(self, token_id: int) -> str:
        """The sentencepiece piece of an id ("\u2581" marks a word start); ids past the
        sentencepiece vocabulary are T5's ``<extra_id_N>`` (N counted down from the last)."""
        size = self.sp_vocab_size
        if 0 <= token_id < size:
            return str(self._sp.IdToPiece(token_id))
        return f"<extra_id_{size + 99 - token_id}>" if size <= token_id < size + 100 else f"<id_{token_id}>"

    def decode(self, ids: Sequence[int]) -> str:
        # Ids past the sentencepiece vocabulary (T5's padded <extra_id_N> range) are dropped, as
        # they are special tokens that skip_special_tokens=True removes in Transformers too.
        size = self.sp_vocab_size
        kept = [int(i) for i in ids if i not in self._special and 0 <= i < size]
        return str(self._sp.DecodeIds(kept))
