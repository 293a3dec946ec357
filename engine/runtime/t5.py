"""Our own T5 encoder and KV-cached decoder step: ``T5Runtime``, one loaded model on one device.

CTranslate2 has no step-level API and no hidden-state output for encoder-decoder models, which
contrastive search needs; this runtime reads the same converted weights (``model.bin``). It is
three modules put together: t5_weights.py (loading), kv_cache.py (the decoder's state between
steps) and t5_math.py (the forward pass as plain functions; on CPU with the compiled kernel,
t5_fused.py: the same pass on the kernel's fused attention, norm and activation). What is here:
device, dtype and thread choices, the position-bias tables, and the step's hand-over to CUDA graphs.

Shapes: B sequences, m rows per sequence (contrastive candidates), H heads, D = d_kv, T cached
decoder positions, S encoder positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.errors import InvalidRequest
from engine.model.manifest import Manifest
from engine.model.shapes import T5Shape
from engine.model.weights import ModelFile, read_model_file
from engine.runtime import qlinear, t5_fused, t5_math, t5ops
from engine.runtime.kv_cache import Array, DecoderCache, EncoderOutput, StepOutput, mask_value
from engine.runtime.t5_math import ArrayMatmul, Compute, Matmul, relative_position_bucket
from engine.runtime.t5_weights import DecoderLayer, T5Weights, Weight, load_weights
from engine.runtime.xp import array_module

if TYPE_CHECKING:
    from engine.runtime.cuda_graphs import DecoderGraphs

__all__ = ["DecoderCache", "EncoderOutput", "StepOutput", "T5Runtime", "relative_position_bucket"]

_SUPPORTED_DTYPES = {"cpu": ("float32",), "cuda": ("float32", "float16")}


class T5Runtime:
    def __init__(
        self,
        weights: T5Weights,
        xp: Any,
        dtype: np.dtype[Any],
        *,
        threads: int = 1,
        eos_token_id: int = 1,
        decoder_start_token_id: int = 0,
    ) -> None:
        self.weights = weights
        self.shape: T5Shape = weights.shape
        self.xp = xp
        self.dtype = dtype
        self.eos_token_id = eos_token_id
        self.decoder_start_token_id = decoder_start_token_id
        self._matmul = ArrayMatmul(xp, threads)
        self._compute = Compute(xp, dtype, self._matmul, weights.shape)
        self._dec_bias_by_distance: np.ndarray | None = None
        self._own_bias: Array | None = None
        self._graphs: DecoderGraphs | None = None  # see use_cuda_graphs()
        self._fused_on = True  # see use_fused()
        self._layers_call_on = True  # see use_layers_call()
        self._decoder_plan: t5_fused.DecoderPlan | None = None

    @property
    def threads(self) -> int:
        """Threads of the compiled small-batch kernel per product (qlinear); BLAS has its own."""
        return self._matmul.threads

    @threads.setter
    def threads(self, n: int) -> None:
        self._matmul.threads = n

    @property
    def decoder(self) -> list[DecoderLayer]:
        return self.weights.decoder

    @property
    def lm_head(self) -> Weight:
        return self.weights.lm_head

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
        xp = array_module(device)
        if xp is np and qlinear.kernel_available():
            qlinear.single_threaded_blas()
        np_dtype = np.dtype(dtype)
        return cls(
            load_weights(mf, xp, np_dtype, eps),
            xp,
            np_dtype,
            threads=threads or qlinear.default_threads(),
            eos_token_id=eos_token_id,
            decoder_start_token_id=decoder_start_token_id,
        )

    # ------------------------------------------------------------------ fused layers
    def use_fused(self, on: bool) -> None:
        """Attention, norms and activations in the compiled kernel (t5_fused.py) where it runs, or
        numpy (t5_math.py, the reference: tests compare the two)."""
        self._fused_on = on

    def use_layers_call(self, on: bool) -> None:
        """With the fused functions, a decoder step's layers in one kernel call (t5_fused.DecoderPlan,
        the default) or one call a function from Python (tests compare the two; so does
        benchmarks/bench_layers_call.py)."""
        self._layers_call_on = on

    def _plan(self) -> t5_fused.DecoderPlan | None:
        """The decoder's plan for t5ops.decoder_layers, made on first use, where the kernel has it."""
        if not self._layers_call_on or not t5ops.layers_call_available():
            return None
        if self._decoder_plan is None:
            self._decoder_plan = t5_fused.DecoderPlan(self.weights)
        return self._decoder_plan

    @property
    def fused(self) -> bool:
        """Whether the forward pass runs t5_fused.py: on CPU in float32, with the compiled kernel in
        use (qlinear.use_kernel, Config.qlinear) and built with its fused functions."""
        return self._fused_on and self.xp is np and self.dtype == np.float32 and t5ops.available()

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
        c, w = self._compute, self.weights
        padded = np.zeros((batch, n), dtype=np.int64)
        key_mask = np.zeros((batch, 1, 1, n), dtype=np.float32)
        for b, ids in enumerate(prompts):
            padded[b, : len(ids)] = ids
            key_mask[b, ..., len(ids) :] = mask_value(self.dtype)
        pos = np.arange(n)
        buckets = relative_position_bucket(
            pos[None, :] - pos[:, None],
            bidirectional=True,
            num_buckets=s.relative_attention_num_buckets,
            max_distance=s.relative_attention_max_distance,
        )
        position_bias = self.weights.encoder_bias_table[buckets].transpose(2, 0, 1)  # [H, S, S]
        if self.fused:  # the kernel skips each prompt's padded keys itself
            lengths = np.array([len(ids) for ids in prompts], dtype=np.int64)
            bias = np.ascontiguousarray(position_bias, dtype=np.float32)
            enc = t5_fused.encoder(c, w, padded.reshape(-1), bias, lengths)
        else:
            # [B, H, S, S]: the position bias plus the padding mask of the keys (kept in the dtype's range).
            host_bias = np.maximum(position_bias[None] + key_mask, mask_value(self.dtype))
            bias = xp.asarray(host_bias, dtype=self.dtype)
            enc = t5_math.encoder(c, w, xp.asarray(padded.reshape(-1)), bias, batch, n)
        kv = t5_math.cross_kv(c, w, enc, batch, n)  # [2, B, L, H, S, D]
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
        past[dist <= 0] = mask_value(self.dtype)
        return np.ascontiguousarray(past.transpose(0, 2, 1)[:, :, None, :], dtype=self.dtype)

    def _bias_by_distance(self, width: int) -> np.ndarray:
        """The decoder's relative position bias by distance 0..width (at least), [distance, H] (host).
        Grown to twice the width when too short, so that a row's widening by one each step rebuilds
        it a logarithmic number of times, not at every step."""
        if self._dec_bias_by_distance is None or self._dec_bias_by_distance.shape[0] <= width:
            s = self.shape
            distances = np.arange(max(2 * (width + 1), 64))
            buckets = relative_position_bucket(
                -distances,
                bidirectional=False,
                num_buckets=s.relative_attention_num_buckets,
                max_distance=s.relative_attention_max_distance,
            )
            self._dec_bias_by_distance = self.weights.decoder_bias_table[buckets]
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
        if self.fused:  # the kernel reads the bias by distance itself
            table = self._bias_by_distance(width)
            return t5_fused.decoder_step(
                self._compute, self.weights, cache, tokens.reshape(-1), (batch, m), table, self._plan()
            )
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
        mm: Matmul | None = None,
    ) -> StepOutput:
        """The step from device inputs: token ids [B*m], past bias [B, H, 1, width], own bias
        [H, 1, 1]. Attends over past positions 0..width-1 (the bias masks the unfilled ones), so a
        fixed ``width`` (the cache's capacity) gives a step of fixed shapes that a graph can hold.
        ``mm``: the products' implementation for this step (cuBLAS while a graph is captured)."""
        c = self._compute if mm is None else Compute(self.xp, self.dtype, mm, self.shape)
        return t5_math.decoder_step(c, self.weights, cache, token_ids, rows, past_bias, own_bias, width)

    def logits(self, hidden: Array) -> Array:
        """lm_head on final-norm hidden states [R, d] -> [R, V]."""
        return t5_math.logits(self._compute, self.weights, hidden)
