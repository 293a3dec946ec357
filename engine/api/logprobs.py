"""Log-probabilities on the wire: the engine's ``TokenLogprob``s as protobuf messages, with the
token strings (sentencepiece pieces) and text offsets that only the server's tokenizer knows, and
OpenAI's two shapes of them (legacy completions, chat) built from those messages.

The gRPC servicer fills the messages (``job_logprobs_to_pb``, ``token_logprob_to_pb``); the OpenAI
routes, which may run in another process, read them (``completion_logprobs``, ``chat_logprobs``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from engine.api.deltas import Decode
from engine.api.pb import engine_pb2
from engine.runtime.result import TokenLogprob

# id -> its sentencepiece piece (Tokenizer.piece).
Piece = Callable[[int], str]

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_logprob_to_pb(lp: TokenLogprob, piece: Piece | None, text_offset: int = 0) -> Any:
    def name(token_id: int) -> str:
        return piece(token_id) if piece is not None else ""

    msg = engine_pb2.TokenLogprob(
        token_id=lp.token_id, logprob=lp.logprob, token=name(lp.token_id), text_offset=text_offset
    )
    for token_id, logprob in lp.top:
        msg.top.add(token_id=token_id, logprob=logprob, token=name(token_id))
    return msg


def text_offsets(ids: Sequence[int], text: str, decode: Decode | None) -> list[int]:
    """Where each id's text starts in ``text`` (the completion, cut at a stop sequence): the length
    of the decoded ids before it, at most the text's length."""
    if decode is None:
        return [0] * len(ids)
    return [min(len(decode(ids[:i])), len(text)) for i in range(len(ids))]


def row_logprobs_to_pb(
    row: Sequence[TokenLogprob], text: str, piece: Piece | None, decode: Decode | None
) -> Any:
    offsets = text_offsets([t.token_id for t in row], text, decode)
    return engine_pb2.TokenLogprobs(
        tokens=[token_logprob_to_pb(t, piece, off) for t, off in zip(row, offsets, strict=True)]
    )


def seed_logprobs(rows: Sequence[Any]) -> list[list[dict[str, Any]]]:
    """The seed poll reply's ``logprobs`` (docs/api.md): per prompt, per token."""
    return [
        [
            {
                "tokenId": t.token_id,
                "token": t.token,
                "logprob": t.logprob,
                "textOffset": t.text_offset,
                "top": [{"tokenId": a.token_id, "token": a.token, "logprob": a.logprob} for a in t.top],
            }
            for t in row.tokens
        ]
        for row in rows
    ]


# ---- OpenAI's shapes ------------------------------------------------------------------------
def piece_bytes(token: str) -> list[int]:
    """The UTF-8 bytes a piece stands for: a byte-fallback piece ``<0xE6>`` is that byte, and
    sentencepiece's word-start mark "\u2581" is a space."""
    m = _BYTE_PIECE.fullmatch(token)
    if m is not None:
        return [int(m.group(1), 16)]
    return list(token.replace("\u2581", " ").encode("utf-8"))


def completion_logprobs(tokens: Sequence[Any]) -> dict[str, Any]:
    """OpenAI's legacy completions ``logprobs``: tokens, token_logprobs, top_logprobs (a dict piece
    -> logprob per token) and text_offset (where each token's text starts in the completion)."""
    return {
        "tokens": [t.token for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [{a.token: a.logprob for a in t.top} for t in tokens],
        "text_offset": [t.text_offset for t in tokens],
    }


def chat_logprobs(tokens: Sequence[Any], top: int) -> dict[str, Any]:
    """OpenAI's chat ``logprobs``: ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""
    return {
        "content": [
            {
                "token": t.token,
                "logprob": t.logprob,
                "bytes": piece_bytes(t.token),
                "top_logprobs": [
                    {"token": a.token, "logprob": a.logprob, "bytes": piece_bytes(a.token)}
                    for a in t.top[:top]
                ],
            }
            for t in tokens
        ]
    }
