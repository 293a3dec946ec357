"""engine convert: the numpy spec conversion against CTranslate2's own converter, and its errors."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import ctranslate2
import numpy as np
import pytest

from engine.errors import InvalidRequest, ModelError
from engine.model.convert import convert_checkpoint, convert_model
from engine.model.manifest import QUANTIZATIONS, Manifest
from engine.model.safetensors_io import SafetensorsFile
from engine.model.shapes import TINY_FLAN, TINY_T5
from engine.model.tokenizer import Tokenizer
from tests import models

ROOT = Path(__file__).resolve().parents[1]
# The installed console script, as users run it (python -m engine where it is not installed).
_SCRIPT = Path(sys.executable).with_name("engine")
ENGINE = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "engine"]
PROMPTS = [
    "Translate to German: the house is wonderful.",
    "hi",
    "Return the first release in which this feature was recognized, as a tuple of five numbers.",
    "Summarize: the socket is closed when the file object is garbage collected.",
]


def _decode_ids(model_dir: Path, input_ids: list[list[int]], **options: Any) -> list[list[int]]:
    """Generated ids through ctranslate2.Translator directly (no engine code)."""
    vocab: list[str] = json.loads((model_dir / "shared_vocabulary.json").read_text())
    first_id: dict[str, int] = {}
    for i, token in enumerate(vocab):
        first_id.setdefault(token, i)
    translator = ctranslate2.Translator(str(model_dir), device="cpu", compute_type="float32", intra_threads=1)
    results = translator.translate_batch([[vocab[i] for i in ids] for ids in input_ids], **options)
    return [[first_id[t] for t in r.hypotheses[0]] for r in results]


def _scores(model_dir: Path, input_ids: list[list[int]], **options: Any) -> list[float]:
    vocab: list[str] = json.loads((model_dir / "shared_vocabulary.json").read_text())
    translator = ctranslate2.Translator(str(model_dir), device="cpu", compute_type="float32", intra_threads=1)
    results = translator.translate_batch(
        [[vocab[i] for i in ids] for ids in input_ids], return_scores=True, **options
    )
    return [float(r.scores[0]) for r in results]


def _input_ids(hf_dir: Path) -> list[list[int]]:
    return Tokenizer(hf_dir / "spiece.model").encode_batch(PROMPTS)


@pytest.fixture(scope="module", params=["flan", "t5"])
def both_conversions(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Path, Path]:
    """(kind, ours, CTranslate2's TransformersConverter) on the same float32 checkpoint."""
    from ctranslate2.converters import TransformersConverter

    kind = request.param
    theirs = tmp_path_factory.mktemp(f"ct2-reference-{kind}") / "model"
    TransformersConverter(str(models.hf_checkpoint(kind))).convert(str(theirs), quantization="float32")
    return kind, models.converted_model(kind, "float32"), theirs


def test_same_ids_as_ctranslate2_converter(both_conversions: tuple[str, Path, Path]) -> None:
    kind, ours, theirs = both_conversions
    input_ids = _input_ids(models.hf_checkpoint(kind))
    for options in (
        {"beam_size": 1, "max_decoding_length": 24},
        {"beam_size": 4, "max_decoding_length": 16, "length_penalty": 1.0},
        {"beam_size": 3, "max_decoding_length": 12, "length_penalty": 0.6, "num_hypotheses": 1},
    ):
        ours_ids = _decode_ids(ours, input_ids, **options)
        assert ours_ids == _decode_ids(theirs, input_ids, **options), (kind, options)
        assert all(len(ids) > 0 for ids in ours_ids)
    # The log-probabilities too: a missing output scale (tied lm_head) keeps greedy ids but not these.
    ours_scores, theirs_scores = (
        _scores(m, input_ids, beam_size=4, max_decoding_length=8) for m in (ours, theirs)
    )
    np.testing.assert_allclose(ours_scores, theirs_scores, rtol=1e-4, atol=1e-5)
    # Vocabularies agree up to the sentinels; past them ours has unique placeholder names.
    ours_vocab = json.loads((ours / "shared_vocabulary.json").read_text())
    theirs_vocab = json.loads((theirs / "shared_vocabulary.json").read_text())
    assert len(ours_vocab) == len(theirs_vocab) == 32128
    named = Tokenizer(ours / "spiece.model").sp_vocab_size + 100
    assert ours_vocab[:named] == theirs_vocab[:named]
    assert len(set(ours_vocab)) == len(ours_vocab)
    ours_config = json.loads((ours / "config.json").read_text())
    theirs_config = json.loads((theirs / "config.json").read_text())
    for key in ("bos_token", "eos_token", "unk_token", "decoder_start_token"):
        assert ours_config[key] == theirs_config[key]


def test_greedy_ids_match_transformers_in_venv(both_conversions: tuple[str, Path, Path]) -> None:
    """A quick CT2-vs-Transformers check on our own conversion (the reference test is the Engine's)."""
    import torch
    from transformers import T5ForConditionalGeneration

    kind, ours, _ = both_conversions
    hf_dir = models.hf_checkpoint(kind)
    input_ids = _input_ids(hf_dir)
    model = T5ForConditionalGeneration.from_pretrained(hf_dir).eval()
    width = max(map(len, input_ids))
    ids = torch.tensor([x + [0] * (width - len(x)) for x in input_ids])
    mask = (ids != 0).long()
    mask[:, 0] = 1
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    expected = []
    for seq in out.tolist():
        seq = seq[1:]
        expected.append(seq[: seq.index(1)] if 1 in seq else seq)
    assert _decode_ids(ours, input_ids, beam_size=1, max_decoding_length=20) == expected


def test_manifest_fields(flan_model_dir: Path, t5_model_dir: Path) -> None:
    flan, t5 = Manifest.load(flan_model_dir), Manifest.load(t5_model_dir)
    assert (flan.family, flan.feed_forward, flan.tied_embeddings) == ("t5-v1.1", "gated-gelu", False)
    assert (t5.family, t5.feed_forward, t5.tied_embeddings) == ("t5", "relu", True)
    for m, shape in ((flan, TINY_FLAN), (t5, TINY_T5)):
        assert (m.d_model, m.d_ff, m.d_kv, m.num_heads) == (
            shape.d_model,
            shape.d_ff,
            shape.d_kv,
            shape.num_heads,
        )
        assert (m.num_encoder_layers, m.num_decoder_layers, m.vocab_size) == (2, 2, 32128)
        assert (m.pad_token_id, m.eos_token_id, m.decoder_start_token_id) == (0, 1, 0)
        assert (m.relative_attention_num_buckets, m.relative_attention_max_distance) == (32, 128)
        assert m.max_input_length == 512 and m.quantization == "float32"
    assert (flan_model_dir / "spiece.model").read_bytes() == (
        models.hf_checkpoint() / "spiece.model"
    ).read_bytes()


def test_every_quantization_converts_and_loads(tmp_path: Path) -> None:
    hf_dir = models.hf_checkpoint("flan")
    input_ids = _input_ids(hf_dir)[:2]
    sizes = {}
    for q in QUANTIZATIONS:
        out = tmp_path / q
        manifest = convert_checkpoint(hf_dir, out, quantization=q)
        assert manifest.quantization == q
        sizes[q] = (out / "model.bin").stat().st_size
        assert all(len(ids) == 5 for ids in _decode_ids(out, input_ids, beam_size=1, max_decoding_length=5))
    assert sizes["int8"] < sizes["float16"] < sizes["float32"]
    with pytest.raises(InvalidRequest, match="int8_float16"):
        convert_checkpoint(hf_dir, tmp_path / "bad", quantization="int4")


def test_max_input_length_from_tokenizer_config(tmp_path: Path) -> None:
    for limit, expected in ((256, 256), (int(1e30), 512)):
        hf = tmp_path / f"hf{limit}"
        shutil.copytree(models.hf_checkpoint("flan"), hf)
        config = json.loads((hf / "tokenizer_config.json").read_text())
        (hf / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": limit}))
        assert (
            convert_checkpoint(hf, tmp_path / f"out{limit}", quantization="float32").max_input_length
            == expected
        )


def test_mt5_family_converts(tmp_path: Path) -> None:
    hf = tmp_path / "mt5"
    shutil.copytree(models.hf_checkpoint("flan"), hf)
    config = json.loads((hf / "config.json").read_text())
    config.update(model_type="mt5", architectures=["MT5ForConditionalGeneration"])
    (hf / "config.json").write_text(json.dumps(config))
    manifest = convert_checkpoint(hf, tmp_path / "out", quantization="float32")
    assert manifest.family == "mt5"
    input_ids = _input_ids(hf)
    options = {"beam_size": 1, "max_decoding_length": 10}
    assert _decode_ids(tmp_path / "out", input_ids, **options) == _decode_ids(
        models.converted_model("flan"), input_ids, **options
    )


def test_sharded_bfloat16_and_float16_checkpoints(tmp_path: Path) -> None:
    """Sharded safetensors (an index), bfloat16 and float16 weights, as Transformers writes them."""
    import torch
    from transformers import T5ForConditionalGeneration

    hf_dir = models.hf_checkpoint("flan")
    model = T5ForConditionalGeneration.from_pretrained(hf_dir)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="1MB")
    assert (sharded / "model.safetensors.index.json").is_file()
    for name in ("spiece.model", "tokenizer_config.json"):
        shutil.copy(hf_dir / name, sharded / name)
    convert_checkpoint(sharded, tmp_path / "out-sharded", quantization="float32")
    input_ids = _input_ids(hf_dir)
    options = {"beam_size": 1, "max_decoding_length": 12}
    expected = _decode_ids(models.converted_model("flan"), input_ids, **options)
    assert _decode_ids(tmp_path / "out-sharded", input_ids, **options) == expected

    from ctranslate2.converters import TransformersConverter

    for dtype in (torch.bfloat16, torch.float16):
        half = tmp_path / str(dtype).split(".")[-1]
        model.to(dtype).save_pretrained(half)
        for name in ("spiece.model", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(hf_dir / name, half / name)
        name = "encoder.block.0.layer.0.SelfAttention.q.weight"
        want = model.state_dict()[name].float().numpy()
        np.testing.assert_array_equal(
            SafetensorsFile(half / "model.safetensors").get(name).astype(np.float32), want
        )
        ours, theirs = half.with_name(half.name + "-ours"), half.with_name(half.name + "-ct2")
        convert_checkpoint(half, ours, quantization="float32")
        TransformersConverter(str(half)).convert(str(theirs), quantization="float32")
        assert _decode_ids(ours, input_ids, **options) == _decode_ids(theirs, input_ids, **options), dtype


def test_demo_checkpoint_and_conversion_need_neither_torch_nor_transformers(tmp_path: Path) -> None:
    """A serving machine without torch writes and converts a checkpoint: both imports fail in the child."""
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "from pathlib import Path\n"
        "from engine.model.convert import convert_checkpoint\n"
        "from engine.model.demo import write_hf_checkpoint\n"
        "from engine.model.shapes import TINY_T5\n"
        "hf = write_hf_checkpoint(Path(sys.argv[1]), TINY_T5, 0)\n"
        "convert_checkpoint(hf, sys.argv[2], quantization='float32')\n"
        "assert sys.modules['torch'] is None and sys.modules['transformers'] is None\n"
    )
    out = tmp_path / "m"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "hf"), str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == (
        models.hf_checkpoint("t5") / "model.safetensors"
    ).read_bytes()
    input_ids = _input_ids(models.hf_checkpoint("t5"))
    options = {"beam_size": 2, "max_decoding_length": 10}
    assert _decode_ids(out, input_ids, **options) == _decode_ids(
        models.converted_model("t5"), input_ids, **options
    )


def test_pytorch_bin_only_uses_ctranslate2_converter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import T5ForConditionalGeneration

    hf_dir = models.hf_checkpoint("t5")
    binary = tmp_path / "bin"
    T5ForConditionalGeneration.from_pretrained(hf_dir).save_pretrained(binary, safe_serialization=False)
    for name in ("spiece.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(hf_dir / name, binary / name)
    assert (binary / "pytorch_model.bin").is_file() and not (binary / "model.safetensors").exists()
    convert_checkpoint(binary, tmp_path / "out", quantization="float32")
    input_ids = _input_ids(hf_dir)
    options = {"beam_size": 1, "max_decoding_length": 12}
    assert _decode_ids(tmp_path / "out", input_ids, **options) == _decode_ids(
        models.converted_model("t5"), input_ids, **options
    )

    import engine.model.convert as convert_module

    real_find_spec = convert_module.importlib.util.find_spec
    monkeypatch.setattr(
        convert_module.importlib.util,
        "find_spec",
        lambda name: None if name == "torch" else real_find_spec(name),
    )
    with pytest.raises(ModelError, match=r"install them .* or provide model\.safetensors"):
        convert_checkpoint(binary, tmp_path / "out2", quantization="float32")
    assert not (tmp_path / "out2").exists()


def test_force_and_existing_output(tmp_path: Path) -> None:
    hf_dir = models.hf_checkpoint("flan")
    out = tmp_path / "model"
    convert_checkpoint(hf_dir, out, quantization="int8")
    with pytest.raises(ModelError, match="already exists; pass --force"):
        convert_checkpoint(hf_dir, out, quantization="float32")
    assert convert_checkpoint(hf_dir, out, quantization="float32", force=True).quantization == "float32"
    assert Manifest.load(out).quantization == "float32"
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(ModelError, match="does not look like a model folder"):
        convert_checkpoint(hf_dir, precious, quantization="float32", force=True)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_failed_conversion_leaves_nothing(tmp_path: Path) -> None:
    hf = tmp_path / "hf"
    shutil.copytree(models.hf_checkpoint("flan"), hf)
    # A complete header, but one tensor is missing: the failure comes mid-conversion.
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "num_layers": 3}))
    out_parent = tmp_path / "models"
    out_parent.mkdir()
    with pytest.raises(ModelError, match=r"lacks tensor 'encoder\.block\.2"):
        convert_checkpoint(hf, out_parent / "model", quantization="int8")
    assert list(out_parent.iterdir()) == []


# ---- through the real command line -------------------------------------------------------------


def _engine(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*ENGINE, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        check=False,
    )


def _error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_cli_converts_local_folder(tmp_path: Path) -> None:
    proc = _engine("convert", str(models.hf_checkpoint("t5")), "--output", str(tmp_path / "m"))
    assert proc.returncode == 0, proc.stderr
    assert "converted" in proc.stdout
    assert "quantizing to int8" in proc.stderr  # progress lines go to stderr
    assert Manifest.load(tmp_path / "m").quantization == "int8"


def test_cli_errors(tmp_path: Path) -> None:
    hf_dir = models.hf_checkpoint("flan")
    out = str(tmp_path / "out")

    assert "does not exist" in _error_line(
        _engine("convert", str(tmp_path / "missing" / "dir"), "--output", out)
    )

    corrupt = tmp_path / "corrupt"
    shutil.copytree(hf_dir, corrupt)
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 2])
    line = _error_line(_engine("convert", str(corrupt), "--output", out))
    assert "corrupt or truncated" in line and "model.safetensors" in line

    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(
        json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]})
    )
    line = _error_line(_engine("convert", str(bert), "--output", out))
    assert "model_type='bert'" in line and "T5" in line

    line = _error_line(_engine("convert", str(hf_dir), "--output", out, "--quantization", "int3"))
    assert "unknown quantization 'int3'" in line and "int8_bfloat16" in line

    existing = tmp_path / "existing"
    existing.mkdir()
    assert "pass --force" in _error_line(_engine("convert", str(hf_dir), "--output", str(existing)))
    assert not Path(out).exists()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_cli_hub_unreachable_fails_fast(tmp_path: Path) -> None:
    env = {
        "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}",
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_OFFLINE": "0",
    }
    start = time.monotonic()
    line = _error_line(_engine("convert", "google/flan-t5-small", "--output", str(tmp_path / "m"), env=env))
    assert time.monotonic() - start < 30
    assert "cannot be reached" in line and "engine convert PATH/TO/FOLDER" in line
    assert not (tmp_path / "m").exists()


def test_convert_model_unreachable_hub_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelError, match="cannot be reached"):
        convert_model("google/flan-t5-small", tmp_path / "m", hub_timeout_s=1.0)


def test_hub_id_converts_from_local_hub_cache_when_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Offline, a Hub id still converts when its files are in the Hub cache (huggingface_hub's layout)."""
    from huggingface_hub import constants

    cache = tmp_path / "cache"
    commit = "0" * 40
    repo = cache / "models--google--flan-t5-small"
    shutil.copytree(models.hf_checkpoint("flan"), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    manifest = convert_model("google/flan-t5-small", tmp_path / "m", "float32", hub_timeout_s=1.0)
    assert (manifest.source, manifest.family, manifest.random_weights) == (
        "google/flan-t5-small",
        "t5-v1.1",
        False,
    )
    input_ids = _input_ids(models.hf_checkpoint("flan"))
    options = {"beam_size": 1, "max_decoding_length": 8}
    assert _decode_ids(tmp_path / "m", input_ids, **options) == _decode_ids(
        models.converted_model("flan"), input_ids, **options
    )


def _use_hub(monkeypatch: pytest.MonkeyPatch, url: str, cache: Path) -> None:
    """Point huggingface_hub at ``url`` as HF_ENDPOINT would (it reads it at import, in two modules)."""
    from huggingface_hub import constants, file_download

    template = url + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setattr(file_download, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))


class _FakeHub:
    """Just enough of the Hub's HTTP API for ``snapshot_download``: repo info, HEAD and GET of files."""

    def __init__(self, repo_id: str, folder: Path, extra_files: dict[str, bytes]) -> None:
        import hashlib
        import http.server
        import threading

        self.commit = "1" * 40
        self.files = {p.name: p.read_bytes() for p in folder.iterdir()} | extra_files
        self.requested: list[str] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _file(self) -> tuple[str, bytes] | None:
                prefix = f"/{repo_id}/resolve/"
                if not self.path.startswith(prefix):
                    return None
                name = self.path[len(prefix) :].split("/", 1)[1]
                return (name, hub.files[name]) if name in hub.files else None

            def _headers(self, name: str, body: bytes) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("ETag", '"' + hashlib.sha1(body).hexdigest() + '"')
                self.send_header("X-Repo-Commit", hub.commit)
                self.end_headers()

            def do_HEAD(self) -> None:
                found = self._file()
                if found is None:
                    self.send_error(404)
                    return
                self._headers(*found)

            def do_GET(self) -> None:
                if self.path.startswith(f"/api/models/{repo_id}"):
                    siblings = [{"rfilename": n} for n in sorted(hub.files)]
                    body = json.dumps({"id": repo_id, "sha": hub.commit, "siblings": siblings}).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                found = self._file()
                if found is None:
                    self.send_error(404)
                    return
                hub.requested.append(found[0])
                self._headers(*found)
                self.wfile.write(found[1])

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_hub_download_fetches_only_needed_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    extra = {"tf_model.h5": b"x" * 1000, "flax_model.msgpack": b"y" * 1000, "pytorch_model.bin": b"z" * 1000}
    hub = _FakeHub("acme/tiny-t5", models.hf_checkpoint("t5"), extra)
    try:
        _use_hub(monkeypatch, hub.url, tmp_path / "cache")
        manifest = convert_model("acme/tiny-t5", tmp_path / "m", "float32", hub_timeout_s=2.0)
    finally:
        hub.close()
    assert manifest.source == "acme/tiny-t5" and manifest.family == "t5"
    assert "model.safetensors" in hub.requested and "spiece.model" in hub.requested
    assert not set(extra) & set(hub.requested)
    input_ids = _input_ids(models.hf_checkpoint("t5"))
    options = {"beam_size": 1, "max_decoding_length": 8}
    assert _decode_ids(tmp_path / "m", input_ids, **options) == _decode_ids(
        models.converted_model("t5"), input_ids, **options
    )


def test_hub_download_falls_back_to_pytorch_bin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import T5ForConditionalGeneration

    hf_dir = models.hf_checkpoint("flan")
    repo = tmp_path / "repo"
    T5ForConditionalGeneration.from_pretrained(hf_dir).save_pretrained(repo, safe_serialization=False)
    for name in ("spiece.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(hf_dir / name, repo / name)
    hub = _FakeHub("acme/bin-only", repo, {})
    try:
        _use_hub(monkeypatch, hub.url, tmp_path / "cache")
        convert_model("acme/bin-only", tmp_path / "m", "float32", hub_timeout_s=2.0)
    finally:
        hub.close()
    assert "pytorch_model.bin" in hub.requested
    input_ids = _input_ids(hf_dir)
    options = {"beam_size": 1, "max_decoding_length": 8}
    assert _decode_ids(tmp_path / "m", input_ids, **options) == _decode_ids(
        models.converted_model("flan"), input_ids, **options
    )


def test_vocabulary_names_every_id_once() -> None:
    from dataclasses import replace

    from engine.model.checkpoint import load_checkpoint
    from engine.model.spec import vocabulary

    ckpt = load_checkpoint(models.hf_checkpoint("flan"))
    pieces = Tokenizer(ckpt.tokenizer.spiece).sp_vocab_size
    tokens = vocabulary(ckpt)
    assert len(tokens) == len(set(tokens)) == 32128
    assert tokens[:3] == ["<pad>", "</s>", "<unk>"]
    assert (tokens[pieces], tokens[pieces + 99], tokens[pieces + 100]) == (
        "<extra_id_99>",
        "<extra_id_0>",
        "<extra_id_100>",
    )
    # mT5-like: room for only 28 sentinels past the pieces; they fit, named as T5Tokenizer would.
    tight = replace(ckpt, shape=replace(ckpt.shape, vocab_size=pieces + 28))
    tokens = vocabulary(tight)
    assert len(tokens) == len(set(tokens)) == pieces + 28 and tokens[-1] == "<extra_id_0>"
    with pytest.raises(ModelError, match="does not belong"):
        vocabulary(replace(ckpt, shape=replace(ckpt.shape, vocab_size=pieces - 1)))


def test_architectures_checked(tmp_path: Path) -> None:
    for archs, ok in ((["T5EncoderModel"], False), (["T5WithLMHeadModel"], True), ([], True)):
        hf = tmp_path / f"hf-{len(archs)}-{ok}"
        shutil.copytree(models.hf_checkpoint("t5"), hf)
        config = json.loads((hf / "config.json").read_text())
        (hf / "config.json").write_text(json.dumps({**config, "architectures": archs}))
        if ok:
            assert convert_checkpoint(hf, tmp_path / f"out-{hf.name}", quantization="int8").family == "t5"
        else:
            with pytest.raises(ModelError, match=r"needs T5ForConditionalGeneration"):
                convert_checkpoint(hf, tmp_path / f"out-{hf.name}", quantization="int8")
