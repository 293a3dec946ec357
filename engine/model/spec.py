"""Fill CTranslate2's Transformer spec from a T5 checkpoint with numpy (no torch, no Transformers).

This mirrors ``ctranslate2.converters.transformers.T5Loader`` (CTranslate2 4.8) name for name:
pre-norm RMS layer norms, fused QKV (self-attention) and KV (cross-attention) projections, the
first layer's relative attention bias shared by every layer of a stack, gated FFN as
``linear_0`` (activated, wi_0) and ``linear_0_noact`` (wi_1), unscaled embeddings and queries,
and, for original T5 with lm_head tied to the embeddings, the decoder output scaled by
d_model**-0.5. ``tests/test_model_convert.py`` shows both conversions decode to the same ids.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from ctranslate2.specs import common_spec, transformer_spec

from engine.errors import ModelError
from engine.model.checkpoint import Checkpoint, Weights
from engine.model.shapes import T5Shape

# Transformers' T5Config turns feed_forward_proj into dense_act_fn: "gated-gelu" -> "gelu_new".
_ACTIVATIONS = {
    "relu": common_spec.Activation.RELU,
    "gated-gelu": common_spec.Activation.GELUTanh,
}


def vocabulary(ckpt: Checkpoint) -> list[str]:
    """Token strings by id: the sentencepiece pieces, then T5Tokenizer's sentinels (``<extra_id_0>``
    has the highest id of them, as in Transformers), then placeholders up to the model's vocab_size.

    T5Loader names the placeholders ``<extra_id_0>``, ``<extra_id_1>``, ... again, so that their
    names repeat real sentinels' and a token string no longer tells its id; here they continue the
    numbering (``<extra_id_100>``, ...) so that every id has its own string. Up to the sentinels
    both lists are the same (tests/test_model_convert.py checks it).
    """
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    sp.Load(str(ckpt.tokenizer.spiece))
    pieces = [sp.IdToPiece(i) for i in range(sp.GetPieceSize())]
    size = ckpt.shape.vocab_size
    if len(pieces) > size:
        raise ModelError(
            f"spiece.model has {len(pieces)} pieces, more than config.json's vocab_size {size}: "
            "the tokenizer does not belong to this checkpoint"
        )
    # A checkpoint without tokenizer_config.json gets T5Tokenizer's default of 100 sentinels; mT5's
    # vocabulary has room for fewer, so only those that fit are named as sentinels.
    extra = min(ckpt.tokenizer.extra_ids, size - len(pieces))
    tokens = pieces + [f"<extra_id_{extra - 1 - k}>" for k in range(extra)]
    tokens += [f"<extra_id_{extra + i}>" for i in range(size - len(tokens))]
    return tokens


def build_spec(ckpt: Checkpoint) -> transformer_spec.TransformerSpec:
    shape = ckpt.shape
    spec = transformer_spec.TransformerSpec.from_config(
        (shape.num_layers, shape.num_decoder_layers),
        shape.num_heads,
        pre_norm=True,
        activation=_ACTIVATIONS[shape.feed_forward],
        ffn_glu=shape.gated,
        relative_attention_bias=True,
        rms_norm=True,
    )
    weights = ckpt.weights()
    embeddings = _embeddings(weights, shape)
    _set_stack(spec.encoder, weights, shape, "encoder", embeddings, is_decoder=False)
    _set_stack(spec.decoder, weights, shape, "decoder", embeddings, is_decoder=True)
    if shape.tied_embeddings:
        spec.decoder.projection.weight = embeddings
        spec.decoder.scale_outputs = shape.d_model**-0.5
    else:
        spec.decoder.projection.weight = weights.get("lm_head.weight", (shape.vocab_size, shape.d_model))

    tokens = vocabulary(ckpt)
    config: Any = spec.config
    config.bos_token = tokens[ckpt.pad_token_id]
    config.eos_token = tokens[ckpt.eos_token_id]
    config.unk_token = "<unk>"
    config.decoder_start_token = tokens[ckpt.decoder_start_token_id]
    # T5Loader leaves this unset and CTranslate2 falls back to 1e-6, T5's usual value; set it
    # from the checkpoint so that one with another epsilon converts right too.
    config.layer_norm_epsilon = shape.layer_norm_epsilon
    spec.register_source_vocabulary(tokens)
    spec.register_target_vocabulary(tokens)
    return spec


def _embeddings(weights: Weights, shape: T5Shape) -> np.ndarray:
    dims = (shape.vocab_size, shape.d_model)
    # save_pretrained keeps one copy of tied tensors: "shared.weight" in Transformers' files,
    # some older exports keep only the encoder's.
    for name in ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        if name in weights:
            return weights.get(name, dims)
    raise ModelError("the checkpoint has no embeddings (shared.weight): is it a complete T5 checkpoint?")


def _set_stack(
    spec: Any, weights: Weights, shape: T5Shape, stack: str, embeddings: np.ndarray, *, is_decoder: bool
) -> None:
    d = shape.d_model
    spec.layer_norm.gamma = weights.get(f"{stack}.final_layer_norm.weight", (d,))
    emb_spec = spec.embeddings[0] if isinstance(spec.embeddings, list) else spec.embeddings
    emb_spec.weight = embeddings
    spec.scale_embeddings = False
    # T5 computes the position bias in the first layer of a stack and reuses it in the others.
    first = spec.layer[0].self_attention
    first.relative_attention_bias = weights.get(
        f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        (shape.relative_attention_num_buckets, shape.num_heads),
    )
    first.relative_attention_max_distance = np.dtype("int32").type(shape.relative_attention_max_distance)
    for i, layer_spec in enumerate(spec.layer):
        prefix = f"{stack}.block.{i}.layer"
        _set_attention(
            layer_spec.self_attention, weights, shape, f"{prefix}.0.SelfAttention", self_attention=True
        )
        layer_spec.self_attention.layer_norm.gamma = weights.get(f"{prefix}.0.layer_norm.weight", (d,))
        if i > 0:
            layer_spec.self_attention.relative_attention_bias = first.relative_attention_bias
            layer_spec.self_attention.relative_attention_max_distance = first.relative_attention_max_distance
        if is_decoder:
            _set_attention(
                layer_spec.attention, weights, shape, f"{prefix}.1.EncDecAttention", self_attention=False
            )
            layer_spec.attention.layer_norm.gamma = weights.get(f"{prefix}.1.layer_norm.weight", (d,))
        ffn = f"{prefix}.{2 if is_decoder else 1}"
        _set_ffn(layer_spec.ffn, weights, shape, ffn)


def _set_attention(spec: Any, weights: Weights, shape: T5Shape, prefix: str, *, self_attention: bool) -> None:
    spec.queries_scale = 1.0  # T5 folds 1/sqrt(d_kv) into the query weights
    d, inner = shape.d_model, shape.inner_dim
    q, k, v = (weights.get(f"{prefix}.{n}.weight", (inner, d)) for n in "qkv")
    # T5's projections have no biases, so fusing them is concatenating their weights (what
    # ctranslate2.converters.utils.fuse_linear does; importing that package imports Transformers).
    if self_attention:
        spec.linear[0].weight = np.concatenate([q, k, v])
    else:
        spec.linear[0].weight = q
        spec.linear[1].weight = np.concatenate([k, v])
    spec.linear[-1].weight = weights.get(f"{prefix}.o.weight", (d, inner))


def _set_ffn(spec: Any, weights: Weights, shape: T5Shape, prefix: str) -> None:
    d, ff = shape.d_model, shape.d_ff
    if shape.gated:
        spec.linear_0.weight = weights.get(f"{prefix}.DenseReluDense.wi_0.weight", (ff, d))
        spec.linear_0_noact.weight = weights.get(f"{prefix}.DenseReluDense.wi_1.weight", (ff, d))
    else:
        spec.linear_0.weight = weights.get(f"{prefix}.DenseReluDense.wi.weight", (ff, d))
    spec.linear_1.weight = weights.get(f"{prefix}.DenseReluDense.wo.weight", (d, ff))
    spec.layer_norm.gamma = weights.get(f"{prefix}.layer_norm.weight", (d,))
