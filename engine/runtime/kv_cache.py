"""The decoder's state between steps: preallocated K/V arrays the batch owns (TGI's batch pattern).

``EncoderOutput`` is one prompt's cross-attention K/V; ``DecoderCache`` holds a batch's
self-attention K/V, cross-attention K/V and contrastive context, and knows how to drop rows
(``filter``), join another cache (``concatenate``) and keep each sequence's chosen row of a step
(``commit``). ``StepOutput`` is what one decoder step returns.

Shapes: L layers, B sequences, m rows per sequence (contrastive candidates), H heads, D = d_kv,
Tcap cached decoder positions, Scap encoder positions, d = d_model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from engine.runtime.xp import to_numpy

Array = Any  # numpy.ndarray or cupy.ndarray: the code uses the operations both share


def mask_value(dtype: Any) -> float:
    """Added to masked attention scores, as Hugging Face does: the compute dtype's finfo.min, not
    -inf (no NaN rows), and never past what the dtype holds (float16 would cast it to -inf)."""
    return float(np.finfo(dtype).min)


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
            bias[b, ..., enc.length :] = mask_value(dtype)
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
            mask_value(self.cross_bias.dtype),
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
