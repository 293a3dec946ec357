"""Our T5 runtime (engine/runtime/t5.py): buckets, cache bookkeeping, greedy == CTranslate2 float32."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from transformers.models.t5.modeling_t5 import T5Attention

from engine.errors import InvalidRequest, ModelError
from engine.model.weights import read_model_file
from engine.runtime import t5 as t5_module
from engine.runtime.decoder_batch import run_on_decoder
from engine.runtime.params import DecodingParams
from engine.runtime.result import FinishReason, GenerationRequest
from engine.runtime.t5 import T5Runtime, relative_position_bucket
from engine.runtime.xp import array_module
from tests import models
from tests.models import ct2_greedy, prompts


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize(("buckets", "distance"), [(32, 128), (16, 20), (8, 7)])
def test_buckets_equal_transformers(bidirectional: bool, buckets: int, distance: int) -> None:
    rel = np.arange(-700, 700)
    expected = T5Attention._relative_position_bucket(
        torch.tensor(rel), bidirectional=bidirectional, num_buckets=buckets, max_distance=distance
    ).numpy()
    got = relative_position_bucket(
        rel, bidirectional=bidirectional, num_buckets=buckets, max_distance=distance
    )
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("kind", ["flan", "t5"])
def test_greedy_equals_ctranslate2_float32(kind: str) -> None:
    model_dir = models.converted_model(kind, "float32")
    runtime = T5Runtime.load(model_dir)
    inputs = prompts(7, (3, 17, 9, 30))
    expected = ct2_greedy(model_dir, inputs, 24)
    # k = 1, and alpha = 0 with k > 1: both are greedy on the same decoder path.
    for raw in ({"max_new_tokens": 24}, {"max_new_tokens": 24, "penalty_alpha": 0.0, "top_k": 4}):
        params = DecodingParams.from_dict(raw)
        got = run_on_decoder(runtime, [GenerationRequest(ids, params) for ids in inputs])
        assert [list(r.token_ids) for r in got] == expected
        for r, e in zip(got, expected, strict=True):
            assert r.finish_reason is (FinishReason.LENGTH if len(e) == 24 else FinishReason.EOS)
    assert any(len(e) > 10 for e in expected)  # the comparison covers real sequences, not instant EOS


def test_cache_filter_and_concatenate_keep_each_rows_state() -> None:
    runtime = T5Runtime.load(models.converted_model("flan", "float32"))
    inputs = prompts(3, (4, 12, 7))

    def run(cache_rows: list[int], steps: int) -> np.ndarray:
        cache = runtime.new_cache([runtime.encode(inputs[i]) for i in cache_rows], capacity=steps + 1)
        hidden = []
        for t in range(steps):
            tokens = np.array([[0 if t == 0 else 5 + t + i] for i in cache_rows])
            out = runtime.decoder_step(cache, tokens)
            hidden.append(out.hidden[:, 0])
            cache.commit(out, np.zeros(len(cache_rows), dtype=np.int64))
        return np.stack(hidden, axis=1)

    alone = [run([i], 4) for i in range(3)]
    together = run([0, 1, 2], 4)
    for i in range(3):
        np.testing.assert_allclose(together[i], alone[i][0], atol=1e-5)

    # Join row 2 into a cache of rows 0 and 1 after two steps, then drop row 0: row states survive.
    a = runtime.new_cache([runtime.encode(inputs[0]), runtime.encode(inputs[1])], capacity=3)
    b = runtime.new_cache([runtime.encode(inputs[2])], capacity=6)
    for t in range(2):
        out = runtime.decoder_step(a, np.array([[0 if t == 0 else 5 + t], [0 if t == 0 else 6 + t]]))
        a.commit(out, np.zeros(2, dtype=np.int64))
    a.concatenate(b)
    assert len(a) == 3 and a.capacity == 6 and list(a.lengths) == [2, 2, 0]
    a.filter([1, 2])
    assert len(a) == 2 and list(a.lengths) == [2, 0]
    assert a.cross_k.shape[3] == max(len(inputs[1]), len(inputs[2]))  # the widest kept prompt
    out = runtime.decoder_step(a, np.array([[5 + 2 + 1], [0]]))  # run()'s tokens for row 1, step 2
    np.testing.assert_allclose(out.hidden[0, 0], alone[1][0, 2], atol=1e-5)
    np.testing.assert_allclose(out.hidden[1, 0], alone[2][0, 0], atol=1e-5)


def test_int8_folder_keeps_int8_weights_and_their_dequantized_copy() -> None:
    folder = models.converted_model("t5", "int8")
    runtime = T5Runtime.load(folder)
    mf = read_model_file(folder)
    assert runtime.lm_head.stored.dtype == np.int8  # what the small-batch kernel reads
    np.testing.assert_array_equal(runtime.lm_head.dense, mf.float32("decoder/projection/weight"))
    assert runtime.shape.output_scale == pytest.approx(64**-0.5)
    params = DecodingParams.from_dict({"max_new_tokens": 5, "min_new_tokens": 5})
    (result,) = run_on_decoder(runtime, [GenerationRequest(prompts(1, (6,))[0], params)])
    assert len(result.token_ids) == 5


def test_errors_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="engine convert"):
        T5Runtime.load(tmp_path)
    with pytest.raises(InvalidRequest, match="float32"):
        T5Runtime.load(models.converted_model("flan", "float32"), dtype="float16")
    with pytest.raises(InvalidRequest, match="device"):
        array_module("tpu")
    if importlib.util.find_spec("cupy") is None:
        with pytest.raises(ModelError, match="CuPy"):
            array_module("cuda")


def test_batched_encoder_equals_one_prompt_at_a_time() -> None:
    runtime = T5Runtime.load(models.converted_model("t5", "float32"))
    inputs = prompts(5, (2, 31, 9))
    together = runtime.encode_batch(inputs)
    for ids, enc in zip(inputs, together, strict=True):
        alone = runtime.encode(ids)
        assert enc.keys.shape == alone.keys.shape == (2, 4, len(ids), 16)
        np.testing.assert_allclose(enc.keys, alone.keys, atol=1e-5)
        np.testing.assert_allclose(enc.values, alone.values, atol=1e-5)
    with pytest.raises(InvalidRequest, match="at least one token"):
        runtime.encode_batch([(5, 1), ()])


@pytest.fixture
def numpy_as_cupy(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """A stand-in for CuPy: numpy under another module object, so that T5Runtime takes its CUDA
    code path (plain device arrays, no compiled kernel, float16 allowed) on a machine without a GPU."""
    fake = ModuleType("cupy")
    fake.__dict__.update({k: v for k, v in np.__dict__.items() if not k.startswith("__")})
    monkeypatch.setattr(t5_module, "array_module", lambda device: np if device == "cpu" else fake)
    return fake


@pytest.mark.parametrize("kind", ["flan", "t5"])
def test_cuda_code_path_gives_the_cpu_ids(kind: str, numpy_as_cupy: ModuleType) -> None:
    """The CUDA path's logic, checked on CI without a GPU (test_cuda.py checks it with real CuPy)."""
    folder = models.converted_model(kind, "float32")
    cpu, cuda = T5Runtime.load(folder), T5Runtime.load(folder, device="cuda")
    assert cuda.xp is numpy_as_cupy and cpu.xp is np
    params = DecodingParams.from_dict({"penalty_alpha": 0.6, "top_k": 4, "max_new_tokens": 12})
    requests = [GenerationRequest(ids, params) for ids in prompts(11, (5, 19, 8))]
    assert run_on_decoder(cuda, requests) == run_on_decoder(cpu, requests)


def test_float16_masks_stay_in_range(numpy_as_cupy: ModuleType) -> None:
    """Padding masks are float16's own minimum, not float32's (which casts to -inf with an overflow
    warning, an error under this suite's filterwarnings)."""
    runtime = T5Runtime.load(models.converted_model("flan", "float16"), device="cuda", dtype="float16")
    assert runtime.dtype == np.float16
    params = DecodingParams.from_dict(
        {"penalty_alpha": 0.6, "top_k": 4, "max_new_tokens": 8, "min_new_tokens": 8}
    )
    results = run_on_decoder(runtime, [GenerationRequest(ids, params) for ids in prompts(12, (3, 21))])
    assert [len(r.token_ids) for r in results] == [8, 8]
