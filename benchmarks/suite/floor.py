"""The physical floor of decoding: the weight bytes one decoder step reads, over the bandwidth.

At small batches a decoder step is bound by memory, not arithmetic: every weight of the decoder is
read once per step, whatever the number of rows. So no implementation can take less than
``bytes per step / bandwidth`` per step; the report shows how close each target comes.
What one step reads: per decoder layer the self-attention QKV and output projections, the
cross-attention query and output projections (cross-attention keys and values are computed once
per prompt, not per step) and the feed-forward; then the lm_head. Norms and the one embedding
row are a few KiB and left out.
"""

from __future__ import annotations

from dataclasses import dataclass

from benchmarks.suite.matrix import SMOKE_SHAPE, Strategy, Target
from engine.model.shapes import TINY_FLAN, T5Shape, preset
from engine.runtime import qlinear

# Bytes per weight as each compute type stores it; int8 keeps one float scale per row (ignored:
# under 0.1 % of the bytes for these shapes).
WEIGHT_BYTES = {
    "int8": 1,
    "int8_float32": 1,
    "int8_float16": 1,
    "int8_bfloat16": 1,
    "float16": 2,
    "bfloat16": 2,
    "float32": 4,
}


def shape_of(name: str) -> T5Shape:
    return TINY_FLAN if name == SMOKE_SHAPE else preset(name)


def weights_per_step(shape: T5Shape) -> int:
    """Number of weights one decoder step reads."""
    d, inner, ff = shape.d_model, shape.inner_dim, shape.d_ff
    per_layer = 3 * d * inner + inner * d  # self-attention: q, k, v, o
    per_layer += d * inner + inner * d  # cross-attention: q, o
    per_layer += (2 if shape.gated else 1) * d * ff + ff * d  # feed-forward: wi (gated: 2), wo
    return shape.num_decoder_layers * per_layer + shape.vocab_size * d  # + lm_head


def weight_bytes(target: Target, strategy: Strategy) -> int:
    """Bytes per weight for this target and strategy. Contrastive search runs on our own decoder:
    on CPU its compiled kernel reads an int8 folder's weights as stored (engine/runtime/qlinear.py;
    float32 without the kernel); on CUDA it holds float16 for the float16 compute types, else
    float32 (as Engine loads it)."""
    if not strategy.on_ctranslate2:
        if target.is_cuda:
            return 2 if target.compute_type in ("float16", "int8_float16") else 4
        int8 = target.compute_type.startswith("int8")
        return 1 if int8 and qlinear.kernel_available() else 4
    return WEIGHT_BYTES[target.compute_type]


@dataclass(frozen=True)
class Floor:
    bytes_per_step: int
    bandwidth_gb_per_s: float

    @property
    def ms_per_step(self) -> float:
        return self.bytes_per_step / (self.bandwidth_gb_per_s * 1e9) * 1e3

    def fraction(self, measured_ms_per_step: float) -> float:
        """How much of the floor's speed a measured step reaches (1.0 = at the floor)."""
        return self.ms_per_step / measured_ms_per_step if measured_ms_per_step > 0 else float("nan")


def floor_for(shape: str, target: Target, strategy: Strategy, bandwidth_gb_per_s: float) -> Floor:
    return Floor(weights_per_step(shape_of(shape)) * weight_bytes(target, strategy), bandwidth_gb_per_s)
