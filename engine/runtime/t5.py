"""Our own T5 encoder and KV-cached decoder step, over an array module (numpy on CPU, CuPy on CUDA).

CTranslate2 has no step-level API and no hidden-state output for encoder-decoder models, which
contrastive search needs; this runtime reads the same converted weights (``model.bin``) and
follows Hugging Face's T5 exactly: pre-norm RMSNorm without mean or bias, attention without the
1/sqrt(d) scaling, relative position buckets computed in layer 0 and shared by every layer, no
position bias in cross-attention, gated-GELU (tanh) or ReLU feed-forward, and for tied embeddings
the decoder output scaled by d_model**-0.5 before the lm_head.

Shapes: B sequences, m rows per sequence (contrastive candidates), H heads, D = d_kv, T cached
decoder positions, S encoder positions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.errors import InvalidRequest, ModelError
from engine.model.manifest import Manifest
from engine.model.weights import ModelFile, read_model_file
from engine.runtime import qlinear
from engine.runtime.qlinear import Linear, default_threads
from engine.runtime.xp import array_module, to_numpy

if TYPE_CHECKING:
    from engine.runtime.cuda_graphs import DecoderGraphs, Gemm

Array = Any  # numpy.ndarray or cupy.ndarray: the code below uses the operations both share

_RELU = 0
_GELU_TANH = 1


def _mask_value(dtype: Any) -> float:
    """Added to masked attention scores, as Hugging Face does: the compute dtype's finfo.min, not
    -inf (no NaN rows), and never past what the dtype holds (float16 would cast it to -inf)."""
    return float(np.finfo(dtype).min)


_SUPPORTED_DTYPES = {"cpu": ("float32",), "cuda": ("float32", "float16")}


@dataclass(frozen=True)
class T5Shape:
    d_model: int
    d_kv: int
    num_heads: int
    d_ff: int
    num_encoder_layers: int
    num_decoder_layers: int
    vocab_size: int
    num_buckets: int
    max_distance: int
    gated: bool
    activation: int
    output_scale: float | None  # tied embeddings: d_model**-0.5, else None
    eps: float
    eos_token_id: int
    decoder_start_token_id: int

    @property
    def inner(self) -> int:
        return self.num_heads * self.d_kv


def relative_position_bucket(
    relative_position: np.ndarray, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> np.ndarray:
    """Hugging Face's ``T5Attention._relative_position_bucket``, float32 arithmetic included (the
    log is taken in float32 there, and a different precision moves some bucket boundaries)."""
    rel = relative_position.astype(np.int64)
    buckets = np.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets += (rel > 0).astype(np.int64) * num_buckets
        rel = np.abs(rel)
    else:
        rel = -np.minimum(rel, 0)
    max_exact = num_buckets // 2
    is_small = rel < max_exact
    with np.errstate(divide="ignore"):
        scaled = (
            np.log(rel.astype(np.float32) / np.float32(max_exact))
            / np.float32(math.log(max_distance / max_exact))
            * np.float32(num_buckets - max_exact)
        )
    # torch's .to(long) truncates toward zero; log(0) = -inf only occurs where is_small anyway.
    large = max_exact + np.where(is_small, 0, np.trunc(scaled)).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return buckets + np.where(is_small, rel, large)


@dataclass(frozen=True)
class _Norm:
    gamma: Array  # [d]


@dataclass(frozen=True)
class _FFN:
    norm: _Norm
    wi: Array  # [2F, d] gated (wi_0 over wi_1) or [F, d]
    wo: Array  # [d, F]


@dataclass(frozen=True)
class _EncoderLayer:
    attn_norm: _Norm
    qkv: Array  # [3 * inner, d]
    out: Array  # [d, inner]
    ffn: _FFN


@dataclass(frozen=True)
class _DecoderLayer:
    self_norm: _Norm
    qkv: Array  # [3 * inner, d]
    self_out: Array  # [d, inner]
    cross_norm: _Norm
    cross_q: Array  # [inner, d]
    cross_kv: Array  # [2 * inner, d]
    cross_out: Array  # [d, inner]
    ffn: _FFN


@dataclass(frozen=True)
class EncoderOutput:
    """One prompt's cross-attention keys and values for every decoder layer: [L, H, S, D] each."""

    keys: Array
    values: Array

    @property
    def length(self) -> int:
        return int(self.keys.shape[2])


class DecoderCache:
    """The batch's decoder state, owned as preallocated arrays (text-generation-inference style):
    self-attention K/V [L, B, H, Tcap, D] with ``lengths[b]`` positions filled, cross-attention K/V
    [L, B, H, Scap, D] masked beyond each prompt's length. ``filter`` drops rows, ``concatenate``
    joins two caches (growing capacities as needed)."""

    def __init__(
        self,
        xp: ModuleType,
        self_k: Array,
        self_v: Array,
        cross_k: Array,
        cross_v: Array,
        cross_bias: Array,
        context: Array,
        lengths: np.ndarray,
    ) -> None:
        self.xp = xp
        self.self_k = self_k
        self.self_v = self_v
        self.cross_k = cross_k
        self.cross_v = cross_v
        self.cross_bias = cross_bias  # [B, 1, 1, Scap]: 0 inside the prompt, -inf-like beyond
        # [B, Tcap, d]: the unit-normalized final hidden state of each cached position, i.e.
        # contrastive search's context (its cosine similarities are plain dot products).
        self.context = context
        self.lengths = lengths  # host int64 [B]: decoder positions already in the cache

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def capacity(self) -> int:
        return int(self.self_k.shape[3])

    @classmethod
    def create(
        cls, xp: ModuleType, encoded: Sequence[EncoderOutput], capacity: int, d_model: int, dtype: Any
    ) -> DecoderCache:
        if not encoded:
            raise ValueError("a decoder cache needs at least one sequence")
        layers, heads, _, d_kv = encoded[0].keys.shape
        batch = len(encoded)
        width = max(e.length for e in encoded)
        self_k = xp.zeros((layers, batch, heads, capacity, d_kv), dtype=dtype)
        self_v = xp.zeros_like(self_k)
        cross_k = xp.zeros((layers, batch, heads, width, d_kv), dtype=dtype)
        cross_v = xp.zeros_like(cross_k)
        bias = np.zeros((batch, 1, 1, width), dtype=np.float32)
        for b, enc in enumerate(encoded):
            cross_k[:, b, :, : enc.length] = enc.keys
            cross_v[:, b, :, : enc.length] = enc.values
            bias[b, ..., enc.length :] = _mask_value(dtype)
        context = xp.zeros((batch, capacity, d_model), dtype=dtype)
        return cls(
            xp,
            self_k,
            self_v,
            cross_k,
            cross_v,
            xp.asarray(bias, dtype=dtype),
            context,
            np.zeros(batch, np.int64),
        )

    def filter(self, keep: Sequence[int]) -> None:
        """Keep only rows ``keep`` (in that order); frees the others' memory at once."""
        host = np.asarray(keep, dtype=np.int64)
        self.lengths = self.lengths[host]
        if len(host) == 0:
            return
        idx = self.xp.asarray(host)  # device arrays take device indices
        width = self._used_width(self.cross_bias[idx])
        # Fancy indexing copies: the dropped rows' memory goes with the old arrays.
        self.self_k = self.self_k[:, idx]
        self.self_v = self.self_v[:, idx]
        self.cross_k = self.cross_k[:, idx, :, :width]
        self.cross_v = self.cross_v[:, idx, :, :width]
        self.cross_bias = self.xp.ascontiguousarray(self.cross_bias[idx, ..., :width])
        self.context = self.context[idx]

    def _used_width(self, bias: Array) -> int:
        # The narrowest prompt width that still holds every kept prompt (a row's first masked column).
        inside = to_numpy((bias[:, 0, 0, :] == 0).any(axis=0))
        cols = np.nonzero(inside)[0]
        return int(cols[-1]) + 1 if len(cols) else 1

    def concatenate(self, other: DecoderCache) -> None:
        """Append ``other``'s rows after ours, padding both to the larger capacities."""
        if len(self) == 0:
            self.__dict__.update(other.__dict__)
            return
        xp = self.xp
        t_cap = max(self.capacity, other.capacity)
        width = max(self.cross_k.shape[3], other.cross_k.shape[3])

        def join(a: Array, b: Array, size: int) -> Array:  # [L, B, H, size, D]
            out = xp.zeros((a.shape[0], a.shape[1] + b.shape[1], a.shape[2], size, a.shape[4]), dtype=a.dtype)
            out[:, : a.shape[1], :, : a.shape[3]] = a
            out[:, a.shape[1] :, :, : b.shape[3]] = b
            return out

        self.self_k = join(self.self_k, other.self_k, t_cap)
        self.self_v = join(self.self_v, other.self_v, t_cap)
        self.cross_k = join(self.cross_k, other.cross_k, width)
        self.cross_v = join(self.cross_v, other.cross_v, width)
        bias = xp.full(
            (len(self) + len(other), 1, 1, width),
            _mask_value(self.cross_bias.dtype),
            dtype=self.cross_bias.dtype,
        )
        bias[: len(self), ..., : self.cross_bias.shape[3]] = self.cross_bias
        bias[len(self) :, ..., : other.cross_bias.shape[3]] = other.cross_bias
        self.cross_bias = bias
        context = xp.zeros((len(self) + len(other), t_cap, self.context.shape[2]), dtype=self.context.dtype)
        context[: len(self), : self.context.shape[1]] = self.context
        context[len(self) :, : other.context.shape[1]] = other.context
        self.context = context
        self.lengths = np.concatenate([self.lengths, other.lengths])

    def commit(self, step: StepOutput, choice: np.ndarray) -> Array:
        """Keep each sequence's chosen row of a step (copy-on-select): its K/V entries and its
        normalized hidden state. Returns the chosen rows' hidden states [B, d]."""
        if int(self.lengths.max()) >= self.capacity:
            raise ValueError("decoder cache is full: a sequence ran past its max_new_tokens")
        xp = self.xp
        batch, pos, choice = xp.arange(len(self)), xp.asarray(self.lengths), xp.asarray(choice)
        # Advanced indices split by slices go first: the target view is [B, L, H, D].
        self.self_k[:, batch, :, pos, :] = step.new_k[:, batch, choice].swapaxes(0, 1)
        self.self_v[:, batch, :, pos, :] = step.new_v[:, batch, choice].swapaxes(0, 1)
        chosen = step.hidden[batch, choice]
        self.context[batch, pos] = step.unit_hidden[batch, choice]
        self.lengths = self.lengths + 1
        return chosen


@dataclass(frozen=True)
class StepOutput:
    """One decoder step: final-norm hidden states [B, m, d] and the new K/V rows [L, B, m, H, D]
    (committed to the cache only for the chosen row of each sequence)."""

    hidden: Array
    unit_hidden: Array  # hidden / its L2 norm
    new_k: Array
    new_v: Array


class T5Runtime:
    def __init__(
        self,
        shape: T5Shape,
        xp: ModuleType,
        dtype: Any,
        embeddings: Array,
        encoder: list[_EncoderLayer],
        encoder_norm: _Norm,
        encoder_bias_table: np.ndarray,
        decoder: list[_DecoderLayer],
        decoder_norm: _Norm,
        decoder_bias_table: np.ndarray,
        lm_head: Array,
        threads: int = 1,
    ) -> None:
        self.shape = shape
        self.threads = threads  # for the compiled small-batch kernel (qlinear); BLAS has its own
        self.xp = xp
        self.dtype = dtype
        self.embeddings = embeddings  # [V, d], shared by encoder and decoder inputs
        self.encoder = encoder
        self.encoder_norm = encoder_norm
        self._enc_bias_table = encoder_bias_table  # [num_buckets, H] (host)
        self.decoder = decoder
        self.decoder_norm = decoder_norm
        self._dec_bias_table = decoder_bias_table  # [num_buckets, H] (host)
        self.lm_head = lm_head  # [V, d]
        self._dec_bias_by_distance: Array | None = None
        # Set only while a CUDA graph of the decoder step is captured (engine/runtime/cuda_graphs.py).
        self._gemm: Gemm | None = None
        self._graphs: DecoderGraphs | None = None  # see use_cuda_graphs()
        self._own_bias: Array | None = None

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls, model_dir: str | Path, device: str = "cpu", dtype: str = "float32", threads: int = 0
    ) -> T5Runtime:
        """``threads``: threads of the CPU kernel per product (0: one per core this process may use)."""
        manifest = Manifest.load(model_dir)
        return cls.from_model_file(
            read_model_file(model_dir),
            device=device,
            dtype=dtype,
            threads=threads,
            eps=manifest.layer_norm_epsilon,
            eos_token_id=manifest.eos_token_id,
            decoder_start_token_id=manifest.decoder_start_token_id,
        )

    @classmethod
    def from_model_file(
        cls,
        mf: ModelFile,
        *,
        device: str = "cpu",
        dtype: str = "float32",
        eps: float = 1e-6,
        eos_token_id: int = 1,
        decoder_start_token_id: int = 0,
        threads: int = 0,
    ) -> T5Runtime:
        if threads < 0:
            raise InvalidRequest(f"threads must be >= 0 (0: one per core), got {threads}")
        if dtype not in _SUPPORTED_DTYPES.get(device, ()):
            raise InvalidRequest(
                f"the contrastive runtime computes in {' or '.join(_SUPPORTED_DTYPES.get(device, ('?',)))} "
                f"on {device}, not {dtype}"
            )
        if mf.spec_name != "TransformerSpec" or "decoder/layer_0/attention/linear_1/weight" not in mf:
            raise ModelError(f"model.bin holds a {mf.spec_name}, not a T5 encoder-decoder")
        xp = array_module(device)
        np_dtype = np.dtype(dtype)
        if xp is np and qlinear._KERNEL is not None:
            qlinear.single_threaded_blas()

        def dev(a: np.ndarray) -> Array:
            return xp.asarray(np.ascontiguousarray(a, dtype=np_dtype))

        def lin(*names: str) -> Any:
            """The [out, in] weights of ``names`` stacked along out: a ``Linear`` on CPU (int8 kept
            with its scales for the small-batch kernel), a dequantized device array on CUDA."""
            stored = [mf.raw(f"{n}/weight") for n in names]
            if xp is np and all(w.dtype == np.int8 for w in stored):
                scales = [mf.scale_of(f"{n}/weight") for n in names]
                if any(sc is None for sc in scales):
                    raise ModelError(f"an int8 weight among {names} has no scale")
                return Linear.from_stored(
                    np.concatenate(stored), np.concatenate([sc for sc in scales if sc is not None])
                )
            dense = np.concatenate([mf.float32(f"{n}/weight") for n in names])
            return Linear.from_stored(dense, None) if xp is np else dev(dense)

        def norm(name: str) -> _Norm:
            return _Norm(dev(mf.float32(f"{name}/gamma")))

        embeddings = mf.float32("decoder/embeddings/weight")
        d_model = embeddings.shape[1]
        num_heads = int(mf.scalar("decoder/num_heads"))
        inner = mf.raw("decoder/layer_0/attention/linear_0/weight").shape[0]
        n_enc = _count_layers(mf, "encoder")
        n_dec = _count_layers(mf, "decoder")
        gated = "decoder/layer_0/ffn/linear_0_noact/weight" in mf
        activation = int(mf.scalar("decoder/activation"))
        if activation not in (_RELU, _GELU_TANH):
            raise ModelError(
                f"activation id {activation} is not supported by the contrastive runtime (T5 uses relu, "
                "FLAN-T5 gelu_new)"
            )
        bias_shape = mf.raw("decoder/layer_0/self_attention/relative_attention_bias").shape
        shape = T5Shape(
            d_model=d_model,
            d_kv=inner // num_heads,
            num_heads=num_heads,
            d_ff=mf.raw("decoder/layer_0/ffn/linear_1/weight").shape[1],
            num_encoder_layers=n_enc,
            num_decoder_layers=n_dec,
            vocab_size=embeddings.shape[0],
            num_buckets=bias_shape[0],
            max_distance=int(mf.scalar("decoder/layer_0/self_attention/relative_attention_max_distance")),
            gated=gated,
            activation=activation,
            output_scale=mf.scalar("decoder/scale_outputs") if "decoder/scale_outputs" in mf else None,
            eps=eps,
            eos_token_id=eos_token_id,
            decoder_start_token_id=decoder_start_token_id,
        )

        def ffn(prefix: str) -> _FFN:
            wi = lin(f"{prefix}/linear_0", f"{prefix}/linear_0_noact") if gated else lin(f"{prefix}/linear_0")
            return _FFN(norm(f"{prefix}/layer_norm"), wi, lin(f"{prefix}/linear_1"))

        encoder = [
            _EncoderLayer(
                attn_norm=norm(f"encoder/layer_{i}/self_attention/layer_norm"),
                qkv=lin(f"encoder/layer_{i}/self_attention/linear_0"),
                out=lin(f"encoder/layer_{i}/self_attention/linear_1"),
                ffn=ffn(f"encoder/layer_{i}/ffn"),
            )
            for i in range(n_enc)
        ]
        decoder = [
            _DecoderLayer(
                self_norm=norm(f"decoder/layer_{i}/self_attention/layer_norm"),
                qkv=lin(f"decoder/layer_{i}/self_attention/linear_0"),
                self_out=lin(f"decoder/layer_{i}/self_attention/linear_1"),
                cross_norm=norm(f"decoder/layer_{i}/attention/layer_norm"),
                cross_q=lin(f"decoder/layer_{i}/attention/linear_0"),
                cross_kv=lin(f"decoder/layer_{i}/attention/linear_1"),
                cross_out=lin(f"decoder/layer_{i}/attention/linear_2"),
                ffn=ffn(f"decoder/layer_{i}/ffn"),
            )
            for i in range(n_dec)
        ]
        enc_embeddings = mf.float32("encoder/embeddings_0/weight")
        if not np.array_equal(enc_embeddings, embeddings):
            raise ModelError("encoder and decoder embeddings differ; T5 shares them")
        return cls(
            shape=shape,
            xp=xp,
            dtype=np_dtype,
            embeddings=dev(embeddings),
            encoder=encoder,
            encoder_norm=norm("encoder/layer_norm"),
            encoder_bias_table=mf.float32("encoder/layer_0/self_attention/relative_attention_bias"),
            decoder=decoder,
            decoder_norm=norm("decoder/layer_norm"),
            decoder_bias_table=mf.float32("decoder/layer_0/self_attention/relative_attention_bias"),
            lm_head=lin("decoder/projection"),
            threads=threads or default_threads(),
        )

    # ------------------------------------------------------------------ CUDA graphs
    def use_cuda_graphs(self, on: bool) -> None:
        """On CUDA, replay a captured decoder step instead of launching its ~500 operations one by
        one (engine/runtime/cuda_graphs.py; experimental: the engine turns it on only with
        ``Config.cuda_graphs``, ENGINE_CUDA_GRAPHS=1)."""
        if not on:
            if self._graphs is not None:
                self._graphs.release()
            self._graphs = None
            return
        if self.xp is np:
            raise InvalidRequest("CUDA graphs need device cuda")
        if self._graphs is None:
            from engine.runtime.cuda_graphs import DecoderGraphs

            self._graphs = DecoderGraphs(self)

    def graph_status(self) -> str:
        """One line for logs and benchmarks: whether decoder steps replay a CUDA graph."""
        if self._graphs is None:
            return "off" if self.xp is not np else "off (CPU)"
        return self._graphs.status()

    # ------------------------------------------------------------------ pieces
    def _linear(self, x: Array, weight: Array) -> Array:
        """x [R, in] times weight [out, in] (CTranslate2's layout) -> [R, out]: on CPU a ``Linear``
        (the compiled small-batch kernel or OpenBLAS, see qlinear.py), on CUDA a device array."""
        if isinstance(weight, Linear):
            return weight(x, self.threads)
        if self._gemm is not None:
            return self._gemm.matmul(x, weight, transpose_b=True)
        return x @ weight.T

    def _matmul(self, a: Array, b: Array, transpose_b: bool = False) -> Array:
        """a @ b (or a @ b^T) over the leading batch dimensions; through ``_gemm`` while a CUDA
        graph is captured (cupy.matmul refuses stream capture)."""
        if self._gemm is not None:
            return self._gemm.matmul(a, b, transpose_b=transpose_b)
        return self.xp.matmul(a, b.swapaxes(-1, -2) if transpose_b else b)

    def _rms(self, x: Array, norm: _Norm) -> Array:
        xp = self.xp
        if xp is np:
            # np.mean's own arithmetic (the same pairwise sum, then a division by the count)
            # without its Python wrapper: 24 calls a step, about 4% of a batch-1 run.
            var = np.square(x).sum(axis=-1, keepdims=True)
            var /= x.shape[-1]
        else:
            var = xp.mean(xp.square(x), axis=-1, keepdims=True)
        return (x / xp.sqrt(var + self.shape.eps)) * norm.gamma

    def _ffn(self, x: Array, ffn: _FFN) -> Array:
        h = self._linear(self._rms(x, ffn.norm), ffn.wi)
        if self.shape.gated:
            f = self.shape.d_ff
            gate, lin = h[..., :f], h[..., f:]
            h = self._act(gate) * lin
        else:
            h = self._act(h)
        return self._linear(h, ffn.wo)

    def _act(self, x: Array) -> Array:
        """The activation, into a new array (``x`` may be a view of a larger one)."""
        xp = self.xp
        if self.shape.activation == _RELU:
            return xp.maximum(x, 0)
        # gelu_new, Hugging Face's NewGELUActivation: 0.5 x (1 + tanh(c (x + 0.044715 x^3))), in
        # place on one temporary (torch's pow(x, 3.0) is x * x * x; the 0.5 is an exact scaling).
        t = x * x
        t *= x
        t *= self.dtype.type(0.044715)
        t += x
        t *= self.dtype.type(math.sqrt(2.0 / math.pi))
        xp.tanh(t, out=t)
        t += 1.0
        t *= x
        t *= 0.5
        return t

    def _softmax_(self, scores: Array) -> Array:
        xp = self.xp
        scores -= scores.max(axis=-1, keepdims=True)
        xp.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        return scores

    # ------------------------------------------------------------------ encoder
    def encode(self, input_ids: Sequence[int]) -> EncoderOutput:
        """Run the encoder on one prompt and precompute every decoder layer's cross-attention K/V."""
        return self.encode_batch([input_ids])[0]

    def encode_batch(self, prompts: Sequence[Sequence[int]]) -> list[EncoderOutput]:
        """The encoder for several prompts at once (right-padded, padded keys masked, as
        Transformers does for a batch), so its products run on B*S rows; each prompt's
        cross-attention K/V for every decoder layer, cut to its own length."""
        xp, s = self.xp, self.shape
        for ids in prompts:
            if len(ids) == 0:
                raise InvalidRequest("a prompt must have at least one token")
            if min(ids) < 0 or max(ids) >= s.vocab_size:
                raise InvalidRequest(f"token ids must be in [0, {s.vocab_size})")
        batch, n = len(prompts), max(len(ids) for ids in prompts)
        h, d = s.num_heads, s.d_kv
        padded = np.zeros((batch, n), dtype=np.int64)
        key_mask = np.zeros((batch, 1, 1, n), dtype=np.float32)
        for b, ids in enumerate(prompts):
            padded[b, : len(ids)] = ids
            key_mask[b, ..., len(ids) :] = _mask_value(self.dtype)
        pos = np.arange(n)
        buckets = relative_position_bucket(
            pos[None, :] - pos[:, None],
            bidirectional=True,
            num_buckets=s.num_buckets,
            max_distance=s.max_distance,
        )
        # [B, H, S, S]: relative position bias plus the padding mask of the keys (kept in the dtype's range).
        host_bias = np.maximum(
            self._enc_bias_table[buckets].transpose(2, 0, 1)[None] + key_mask, _mask_value(self.dtype)
        )
        bias = xp.asarray(host_bias, dtype=self.dtype)
        x = self.embeddings[xp.asarray(padded.reshape(-1))]  # [B*S, d]
        for layer in self.encoder:
            qkv = (
                self._linear(self._rms(x, layer.attn_norm), layer.qkv)
                .reshape(batch, n, 3, h, d)
                .transpose(2, 0, 3, 1, 4)
            )  # [3, B, H, S, D]
            scores = xp.matmul(qkv[0], qkv[1].swapaxes(-1, -2))  # [B, H, S, S]
            scores += bias
            attn = xp.matmul(self._softmax_(scores), qkv[2])  # [B, H, S, D]
            x = x + self._linear(attn.transpose(0, 2, 1, 3).reshape(batch * n, h * d), layer.out)
            x = x + self._ffn(x, layer.ffn)
        enc = self._rms(x, self.encoder_norm)
        kv = xp.stack([self._linear(enc, layer.cross_kv) for layer in self.decoder])  # [L, B*S, 2*inner]
        kv = kv.reshape(len(self.decoder), batch, n, 2, h, d).transpose(
            3, 1, 0, 4, 2, 5
        )  # [2, B, L, H, S, D]
        return [
            EncoderOutput(
                xp.ascontiguousarray(kv[0, b, :, :, : len(ids)]),
                xp.ascontiguousarray(kv[1, b, :, :, : len(ids)]),
            )
            for b, ids in enumerate(prompts)
        ]

    # ------------------------------------------------------------------ decoder
    def new_cache(self, encoded: Sequence[EncoderOutput], capacity: int) -> DecoderCache:
        return DecoderCache.create(self.xp, encoded, capacity, self.shape.d_model, self.dtype)

    def past_bias_host(self, lengths: np.ndarray, width: int) -> np.ndarray:
        """Self-attention bias of a query at position ``lengths[b]`` over past keys 0..width-1, on
        the host in the compute dtype: [B, H, 1, width], masked at and beyond each row's length."""
        table = self._bias_by_distance(width)
        dist = lengths[:, None] - np.arange(width)[None, :]  # [B, width]
        past = table[np.clip(dist, 0, None)]  # [B, width, H]
        past[dist <= 0] = _mask_value(self.dtype)
        return np.ascontiguousarray(past.transpose(0, 2, 1)[:, :, None, :], dtype=self.dtype)

    def _bias_by_distance(self, width: int) -> np.ndarray:
        """The decoder's relative position bias by distance 0..width (at least), [distance, H] (host)."""
        if self._dec_bias_by_distance is None or self._dec_bias_by_distance.shape[0] <= width:
            s = self.shape
            distances = np.arange(max(width + 1, 64))
            buckets = relative_position_bucket(
                -distances, bidirectional=False, num_buckets=s.num_buckets, max_distance=s.max_distance
            )
            self._dec_bias_by_distance = self._dec_bias_table[buckets]
        return self._dec_bias_by_distance

    def own_bias(self) -> Array:
        """The bias of a query's own key (distance 0): [H, 1, 1] on the device, made once."""
        if self._own_bias is None:
            self._own_bias = self.xp.asarray(self._bias_by_distance(0)[0].reshape(-1, 1, 1), dtype=self.dtype)
        return self._own_bias

    def decoder_step(self, cache: DecoderCache, tokens: np.ndarray) -> StepOutput:
        """Feed ``tokens`` [B, m] at each sequence's next position: every one of a sequence's m rows
        attends to that sequence's cached past (shared, not copied) plus its own new K/V entry.
        On CUDA with graphs on, a replay of a captured step once the batch's shape is stable."""
        if self._graphs is not None:
            out = self._graphs.step(cache, tokens)
            if out is not None:
                return out
        return self.eager_step(cache, tokens)

    def eager_step(self, cache: DecoderCache, tokens: np.ndarray) -> StepOutput:
        """``decoder_step`` one operation at a time, attending over the batch's longest past only."""
        batch, m = tokens.shape
        width = int(cache.lengths.max()) if batch else 0
        past_bias = self.xp.asarray(self.past_bias_host(cache.lengths, width))
        token_ids = self.xp.asarray(tokens.reshape(-1))
        return self.step_on_device(cache, token_ids, (batch, m), past_bias, self.own_bias(), width)

    def step_on_device(
        self,
        cache: DecoderCache,
        token_ids: Array,
        rows: tuple[int, int],
        past_bias: Array,
        own_bias: Array,
        width: int,
    ) -> StepOutput:
        """The step from device inputs: token ids [B*m], past bias [B, H, 1, width], own bias
        [H, 1, 1]. Attends over past positions 0..width-1 (the bias masks the unfilled ones), so a
        fixed ``width`` (the cache's capacity) gives a step of fixed shapes that a graph can hold."""
        xp, s = self.xp, self.shape
        batch, m = rows
        x = self.embeddings[token_ids]  # [B*m, d]
        new_k = xp.empty((len(self.decoder), batch, m, s.num_heads, s.d_kv), dtype=self.dtype)
        new_v = xp.empty_like(new_k)
        for i, layer in enumerate(self.decoder):
            x = x + self._self_attention(x, layer, cache, i, new_k, new_v, past_bias, own_bias, width)
            x = x + self._cross_attention(x, layer, cache, i, batch, m)
            x = x + self._ffn(x, layer.ffn)
        hidden = self._rms(x, self.decoder_norm).reshape(batch, m, s.d_model)
        unit = hidden / xp.sqrt(xp.square(hidden).sum(axis=-1, keepdims=True))
        return StepOutput(hidden, unit, new_k, new_v)

    def _self_attention(
        self,
        x: Array,
        layer: _DecoderLayer,
        cache: DecoderCache,
        i: int,
        new_k: Array,
        new_v: Array,
        past_bias: Array,
        own_bias: Array,
        width: int,
    ) -> Array:
        xp = self.xp
        _, batch, m, h, d = new_k.shape
        qkv = self._linear(self._rms(x, layer.self_norm), layer.qkv).reshape(batch, m, 3, h, d)
        new_k[i] = qkv[:, :, 1]
        new_v[i] = qkv[:, :, 2]
        q = qkv[:, :, 0].transpose(0, 2, 1, 3)  # [B, H, m, D]
        k_own = new_k[i].transpose(0, 2, 1, 3)
        v_own = new_v[i].transpose(0, 2, 1, 3)
        own = (q * k_own).sum(axis=-1, keepdims=True) + own_bias  # [B, H, m, 1]
        if width:
            # Softmax over [past keys, own key] without concatenating them.
            past = self._matmul(q, cache.self_k[i, :, :, :width], transpose_b=True)  # [B, H, m, T]
            past += past_bias
            top = xp.maximum(past.max(axis=-1, keepdims=True), own)
            past -= top
            xp.exp(past, out=past)
            own = xp.exp(own - top)
            denom = past.sum(axis=-1, keepdims=True) + own
            attn = self._matmul(past, cache.self_v[i, :, :, :width]) + own * v_own
            attn /= denom
        else:
            attn = v_own  # a lone key: softmax weight 1
        return self._linear(attn.transpose(0, 2, 1, 3).reshape(batch * m, h * d), layer.self_out)

    def _cross_attention(
        self, x: Array, layer: _DecoderLayer, cache: DecoderCache, i: int, batch: int, m: int
    ) -> Array:
        h, d = self.shape.num_heads, self.shape.d_kv
        q = (
            self._linear(self._rms(x, layer.cross_norm), layer.cross_q)
            .reshape(batch, m, h, d)
            .transpose(0, 2, 1, 3)
        )
        scores = self._matmul(q, cache.cross_k[i], transpose_b=True)  # [B, H, m, S]
        scores += cache.cross_bias
        attn = self._matmul(self._softmax_(scores), cache.cross_v[i])  # [B, H, m, D]
        return self._linear(attn.transpose(0, 2, 1, 3).reshape(batch * m, h * d), layer.cross_out)

    def logits(self, hidden: Array) -> Array:
        """lm_head on final-norm hidden states [R, d] -> [R, V] (float32)."""
        if self.shape.output_scale is not None:
            hidden = hidden * self.dtype.type(self.shape.output_scale)
        return self._linear(hidden, self.lm_head)


def _count_layers(mf: ModelFile, stack: str) -> int:
    n = 0
    while f"{stack}/layer_{n}/ffn/linear_1/weight" in mf:
        n += 1
    if n == 0:
        raise ModelError(f"model.bin has no {stack} layers")
    return n
