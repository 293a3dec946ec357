"""engine/model/weights.py reads back exactly what CTranslate2 wrote."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from ctranslate2.converters import TransformersConverter
from safetensors.numpy import load_file

from engine.errors import ModelError
from engine.model.weights import read_model_file
from tests import models


def _ct2_convert(hf_dir: Path, out: Path, quantization: str) -> dict[str, object]:
    """Convert with CTranslate2's own converter; return the spec's variables as it serialized them
    (arrays, or the alias target's name)."""
    converter = TransformersConverter(str(hf_dir))
    converter.convert(str(out), quantization=quantization, force=True)
    spec = converter._load()  # the same steps convert() runs before writing
    spec.validate()
    spec.optimize(quantization=quantization)
    variables: dict[str, object] = {}
    for name, value in spec.variables(ordered=True):
        if isinstance(value, str):
            variables[name] = value
        elif value.dtype == "bfloat16":  # numpy has no bfloat16: compare its exact float32 widening
            variables[name] = np.asarray(value.to("float32").numpy())
        else:
            variables[name] = np.asarray(value.numpy())
    return variables


@pytest.mark.parametrize("kind", ["flan", "t5"])
@pytest.mark.parametrize("quantization", ["float32", "int8", "float16", "bfloat16"])
def test_every_variable_reads_back_as_written(tmp_path: Path, kind: str, quantization: str) -> None:
    written = _ct2_convert(models.hf_checkpoint(kind), tmp_path / "m", quantization)
    mf = read_model_file(tmp_path / "m")
    assert set(mf) == set(written)
    for name, value in written.items():
        if isinstance(value, str):
            assert mf.aliases[name] == value
            np.testing.assert_array_equal(mf.raw(name), mf.raw(value))
            continue
        got = mf.raw(name)
        assert isinstance(value, np.ndarray)
        assert got.shape == value.shape, name
        assert got.dtype == value.dtype, name
        np.testing.assert_array_equal(got, value, err_msg=name)


def _source(kind: str) -> dict[str, np.ndarray]:
    return load_file(str(models.hf_checkpoint(kind) / "model.safetensors"))


@pytest.mark.parametrize("kind", ["flan", "t5"])
def test_float32_equals_the_checkpoint(tmp_path: Path, kind: str) -> None:
    _ct2_convert(models.hf_checkpoint(kind), tmp_path / "m", "float32")
    mf = read_model_file(tmp_path / "m")
    src = _source(kind)
    sa = "decoder.block.1.layer.0.SelfAttention"
    fused = np.concatenate([src[f"{sa}.q.weight"], src[f"{sa}.k.weight"], src[f"{sa}.v.weight"]])
    np.testing.assert_array_equal(mf.float32("decoder/layer_1/self_attention/linear_0/weight"), fused)
    ca = "decoder.block.0.layer.1.EncDecAttention"
    np.testing.assert_array_equal(
        mf.float32("decoder/layer_0/attention/linear_0/weight"), src[f"{ca}.q.weight"]
    )
    np.testing.assert_array_equal(
        mf.float32("decoder/layer_0/attention/linear_1/weight"),
        np.concatenate([src[f"{ca}.k.weight"], src[f"{ca}.v.weight"]]),
    )
    # Layer 1 reuses layer 0's relative attention bias (an alias in the file).
    np.testing.assert_array_equal(
        mf.float32("encoder/layer_1/self_attention/relative_attention_bias"),
        src["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"],
    )
    lm_head = src.get("lm_head.weight", src["shared.weight"])
    np.testing.assert_array_equal(mf.float32("decoder/projection/weight"), lm_head)
    np.testing.assert_array_equal(mf.float32("encoder/embeddings_0/weight"), src["shared.weight"])
    if kind == "t5":
        assert mf.scalar("decoder/scale_outputs") == pytest.approx(64**-0.5)
    else:
        assert "decoder/scale_outputs" not in mf


@pytest.mark.parametrize("kind", ["flan", "t5"])
def test_int8_dequantizes_within_one_quantization_step(tmp_path: Path, kind: str) -> None:
    _ct2_convert(models.hf_checkpoint(kind), tmp_path / "m", "int8")
    mf = read_model_file(tmp_path / "m")
    src = _source(kind)
    pairs = {
        "decoder/layer_0/ffn/linear_1/weight": src["decoder.block.0.layer.2.DenseReluDense.wo.weight"],
        "decoder/projection/weight": src.get("lm_head.weight", src["shared.weight"]),
        "decoder/embeddings/weight": src["shared.weight"],
    }
    for name, expected in pairs.items():
        assert mf.raw(name).dtype == np.int8, name
        scale = mf.scale_of(name)
        assert scale is not None
        step = 1.0 / scale.reshape(-1, 1)  # a row is int8_row / scale: rounding moves it by <= step / 2
        err = np.abs(mf.float32(name) - expected)
        assert (err <= step * 0.5 + 1e-6).all(), name


def test_truncated_or_foreign_files_say_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "model.bin").write_bytes(struct.pack("<I", 5) + b"\0" * 8)
    with pytest.raises(ModelError, match="binary version 5"):
        read_model_file(tmp_path)
    src = models.converted_model("flan", "float32") / "model.bin"
    (tmp_path / "model.bin").write_bytes(src.read_bytes()[:5000])
    with pytest.raises(ModelError, match="truncated"):
        read_model_file(tmp_path)
    with pytest.raises(ModelError, match="cannot read"):
        read_model_file(tmp_path / "missing")
