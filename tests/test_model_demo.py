"""Demo models: shapes, the torch-free Hugging Face checkpoint, determinism, and make serve's default."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import ctranslate2
import numpy as np
import pytest
from safetensors.numpy import load_file

from engine.errors import InvalidRequest, ModelError
from engine.model.default import DEMO_DIR_NAME, resolve_default_model
from engine.model.demo import build_demo_model, write_hf_checkpoint
from engine.model.manifest import Manifest
from engine.model.shapes import PRESETS, TINY_FLAN, TINY_T5, T5Shape, preset
from engine.model.tokenizer import Tokenizer
from tests import models

ROOT = Path(__file__).resolve().parents[1]
_SCRIPT = Path(sys.executable).with_name("engine")
ENGINE = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "engine"]


def test_presets_are_flan_t5s_shapes() -> None:
    def dims(s: T5Shape) -> tuple[object, ...]:
        return (s.d_model, s.d_ff, s.num_heads, s.num_layers, s.num_decoder_layers, s.d_kv, s.vocab_size)

    assert dims(PRESETS["small"]) == (512, 1024, 6, 8, 8, 64, 32128)
    assert dims(PRESETS["base"]) == (768, 2048, 12, 12, 12, 64, 32128)
    assert dims(PRESETS["large"]) == (1024, 2816, 16, 24, 24, 64, 32128)
    for s in PRESETS.values():
        assert (s.feed_forward, s.tied_embeddings) == ("gated-gelu", False)
        assert (s.relative_attention_num_buckets, s.relative_attention_max_distance) == (32, 128)
    with pytest.raises(InvalidRequest, match="small, base, large"):
        preset("xl")
    with pytest.raises(InvalidRequest, match="feed_forward"):
        T5Shape(
            d_model=8,
            d_ff=8,
            d_kv=2,
            num_heads=4,
            num_layers=1,
            num_decoder_layers=1,
            feed_forward="swiglu",  # type: ignore[arg-type]  # not a Literal it accepts: the runtime check
        )


@pytest.mark.parametrize("kind", ["flan", "t5"])
def test_hf_checkpoint_loads_in_transformers(kind: str) -> None:
    from transformers import T5ForConditionalGeneration

    hf_dir = models.hf_checkpoint(kind)
    shape = models.SHAPES[kind]
    model, info = T5ForConditionalGeneration.from_pretrained(hf_dir, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []
    assert model.config.tie_word_embeddings is shape.tied_embeddings
    assert model.config.is_gated_act is shape.gated
    assert model.config.dense_act_fn == ("gelu_new" if shape.gated else "relu")
    # The file our streaming writer made reads back the same through the safetensors library.
    tensors = load_file(str(hf_dir / "model.safetensors"))
    state = model.state_dict()
    for name, value in tensors.items():
        np.testing.assert_array_equal(state[name].numpy(), value)
    if shape.tied_embeddings:
        assert "lm_head.weight" not in tensors
        np.testing.assert_array_equal(model.lm_head.weight.detach().numpy(), tensors["shared.weight"])


def test_init_scales_keep_activations_sane() -> None:
    """Unit-scale hidden states and logits spread enough that greedy choices are not near-ties."""
    import torch
    from transformers import T5ForConditionalGeneration

    model = T5ForConditionalGeneration.from_pretrained(models.hf_checkpoint("flan")).eval()
    tok = Tokenizer(models.hf_checkpoint("flan") / "spiece.model")
    ids = torch.tensor([tok.encode("Answer the question: what does the socket module do?")])
    with torch.no_grad():
        out = model(input_ids=ids, decoder_input_ids=torch.tensor([[0, 5, 9, 33]]), output_hidden_states=True)
    encoder_rms = out.encoder_last_hidden_state.pow(2).mean().sqrt().item()
    assert 0.3 < encoder_rms < 3
    logits = out.logits[0]
    assert 0.3 < logits[:, :8000].std().item() < 5
    top2 = logits.topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).min().item() > 1e-3
    # Sentinel and padding rows are damped: greedy output is made of real pieces.
    assert logits.argmax(-1).max().item() < tok.sp_vocab_size


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path: Path) -> None:
    built = [
        build_demo_model(
            tmp_path / name,
            shape=TINY_FLAN,
            seed=seed,
            quantization="int8",
            hf_output=tmp_path / f"hf-{name}",
        )
        for name, seed in (("a", 7), ("b", 7), ("c", 8))
    ]
    assert built[0].source == "demo:custom:seed=7" and built[0].random_weights
    a, b, c = ((tmp_path / n / "model.bin").read_bytes() for n in "abc")
    assert a == b and a != c
    hf_a, hf_b = ((tmp_path / f"hf-{n}" / "model.safetensors").read_bytes() for n in "ab")
    assert hf_a == hf_b
    assert (tmp_path / "a" / "spiece.model").read_bytes() == (tmp_path / "hf-a" / "spiece.model").read_bytes()
    assert not list(tmp_path.glob(".*partial*"))


def test_write_hf_checkpoint_refuses_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="seed"):
        write_hf_checkpoint(tmp_path / "x", TINY_T5, -1)
    small_vocab = T5Shape(
        d_model=8, d_ff=8, d_kv=2, num_heads=2, num_layers=1, num_decoder_layers=1, vocab_size=5000
    )
    with pytest.raises(InvalidRequest, match="vocab_size 5000"):
        write_hf_checkpoint(tmp_path / "y", small_vocab, 0)
    with pytest.raises(InvalidRequest, match="unknown quantization"):
        build_demo_model(tmp_path / "z", shape=TINY_T5, quantization="int2")


@pytest.mark.slow
def test_cli_demo_model_small(tmp_path: Path) -> None:
    out, hf = tmp_path / "demo", tmp_path / "demo-hf"
    proc = subprocess.run(
        [
            *ENGINE,
            "demo-model",
            "--output",
            str(out),
            "--seed",
            "1",
            "--hf-output",
            str(hf),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "RANDOM WEIGHTS" in proc.stdout
    m = Manifest.load(out)
    assert (m.source, m.random_weights, m.quantization, m.family) == (
        "demo:small:seed=1",
        True,
        "int8",
        "t5-v1.1",
    )
    assert (m.d_model, m.d_ff, m.num_heads, m.num_encoder_layers, m.num_decoder_layers) == (
        512,
        1024,
        6,
        8,
        8,
    )
    assert json.loads((hf / "config.json").read_text())["d_model"] == 512
    # It decodes: pieces of the shipped tokenizer come out.
    vocab = json.loads((out / "shared_vocabulary.json").read_text())
    tok = Tokenizer(out / "spiece.model")
    translator = ctranslate2.Translator(str(out), compute_type="int8")
    result = translator.translate_batch(
        [[vocab[i] for i in tok.encode("Translate to German: hello")]], beam_size=1, max_decoding_length=8
    )
    assert len(result[0].hypotheses[0]) == 8
    again = subprocess.run(
        [*ENGINE, "demo-model", "--output", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert again.returncode == 2 and "pass --force" in again.stderr


# ---- make serve's default model -----------------------------------------------------------------


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))


@pytest.mark.slow
def test_default_model_offline_builds_then_reuses_demo(
    tmp_path: Path, offline_hub: None, caplog: pytest.LogCaptureFixture
) -> None:
    models_dir = tmp_path / "models"
    with caplog.at_level(logging.WARNING, logger="engine.model"):
        path, random_weights = resolve_default_model(models_dir, hub_timeout_s=1.0)
    assert (path, random_weights) == (models_dir / DEMO_DIR_NAME, True)
    assert "cannot be reached" in caplog.text
    assert "WEIGHTS ARE RANDOM" in caplog.text and "NOT meaningful text" in caplog.text
    assert Manifest.load(path).d_model == 512
    assert not (models_dir / "flan-t5-small").exists()
    stamp = os.stat(path / "model.bin").st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="engine.model"):
        assert resolve_default_model(models_dir, hub_timeout_s=1.0) == (path, True)
    assert os.stat(path / "model.bin").st_mtime_ns == stamp
    assert "WEIGHTS ARE RANDOM" in caplog.text  # said loudly every time it is served


def test_default_model_prefers_local_folder_and_can_refuse_demo(tmp_path: Path, offline_hub: None) -> None:
    models_dir = tmp_path / "models"
    with pytest.raises(ModelError, match=r"cannot be reached.*ENGINE_ALLOW_DEMO_MODEL"):
        resolve_default_model(models_dir, allow_demo=False, hub_timeout_s=1.0)
    (models_dir / "flan-t5-small").mkdir(parents=True)
    with pytest.raises(ModelError, match="not a model folder"):
        resolve_default_model(models_dir, hub_timeout_s=1.0)
    shutil.rmtree(models_dir / "flan-t5-small")
    shutil.copytree(models.converted_model("flan", "int8"), models_dir / "flan-t5-small")
    assert resolve_default_model(models_dir, hub_timeout_s=1.0) == (models_dir / "flan-t5-small", True)
