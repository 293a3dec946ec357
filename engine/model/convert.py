"""``engine convert``: a Hugging Face T5-family checkpoint (Hub id or folder) -> a model folder.

The output folder holds the CTranslate2 model (model.bin, config.json, shared_vocabulary.json),
the checkpoint's spiece.model and engine.json. Safetensors checkpoints are converted with numpy
alone (``engine.model.spec``); a checkpoint stored only as pytorch_model.bin goes through
CTranslate2's own TransformersConverter, which needs torch. The folder is built beside the
output under a temporary name and renamed at the end, so a failure leaves nothing half-written.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import time
import uuid
from pathlib import Path

from engine.errors import InvalidRequest, ModelError
from engine.model.checkpoint import Checkpoint, load_checkpoint
from engine.model.manifest import MANIFEST_NAME, QUANTIZATIONS, TOKENIZER_NAME, Manifest

# A folder that --force may replace: empty, or one that engine or Transformers wrote.
_REPLACEABLE_MARKERS = (MANIFEST_NAME, "model.bin", "config.json")


def _progress(message: str) -> None:
    print(f"[engine] {message}", file=sys.stderr, flush=True)


def check_quantization(quantization: str) -> None:
    if quantization not in QUANTIZATIONS:
        raise InvalidRequest(
            f"unknown quantization {quantization!r}; choose one of {', '.join(QUANTIZATIONS)}"
        )


def prepare_output(output: Path, *, force: bool) -> None:
    """Refuse an existing output unless ``force``; never replace a folder engine did not make."""
    if not output.exists():
        return
    if not output.is_dir():
        raise ModelError(f"output {output} exists and is a file; choose another --output")
    if not force:
        raise ModelError(f"output folder {output} already exists; pass --force to replace it")
    if any(output.iterdir()) and not any((output / m).exists() for m in _REPLACEABLE_MARKERS):
        raise ModelError(
            f"output folder {output} exists and does not look like a model folder; "
            "not replacing it even with --force: choose another --output"
        )


def convert_model(
    source: str,
    output: str | Path,
    quantization: str = "int8",
    *,
    force: bool = False,
    hub_timeout_s: float = 5.0,
) -> Manifest:
    """Convert a local checkpoint folder or a Hub model id; returns the written manifest.

    ``hub_timeout_s`` bounds how long an unreachable Hub is waited for before giving up.
    """
    from engine.model import hub

    check_quantization(quantization)
    output = Path(output)
    prepare_output(output, force=force)
    local = Path(source).expanduser()
    if local.exists():
        folder = local
    elif hub.looks_like_hub_id(source):
        try:
            folder = hub.download(source, timeout_s=hub_timeout_s)
        except ModelError as exc:
            # "models/flan-t5" may be a mistyped local path as well as a Hub id: say both.
            raise ModelError(f"there is no local folder {source}, and {exc.message}") from exc
    else:
        raise ModelError(
            f"checkpoint folder {source} does not exist (and it is not a Hugging Face Hub model id)"
        )
    return convert_checkpoint(folder, output, quantization=quantization, source=source, force=force)


def convert_checkpoint(
    folder: str | Path,
    output: str | Path,
    *,
    quantization: str = "int8",
    source: str | None = None,
    random_weights: bool = False,
    force: bool = False,
) -> Manifest:
    check_quantization(quantization)
    folder, output = Path(folder), Path(output)
    prepare_output(output, force=force)
    ckpt = load_checkpoint(folder)
    if output.resolve() == folder.resolve() or output.resolve() in folder.resolve().parents:
        raise ModelError(f"output {output} would replace the checkpoint it converts; choose another --output")
    output.parent.mkdir(parents=True, exist_ok=True)
    # Not mkdtemp: its folder is private (0700), and this one becomes the model folder.
    staging = output.parent / f".{output.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        if ckpt.has_safetensors:
            _convert_safetensors(ckpt, staging, quantization)
        else:
            _convert_with_transformers(ckpt, staging, quantization)
        shutil.copyfile(ckpt.tokenizer.spiece, staging / TOKENIZER_NAME)
        manifest = _manifest(ckpt, source or str(folder), quantization, random_weights)
        manifest.save(staging)
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _convert_safetensors(ckpt: Checkpoint, staging: Path, quantization: str) -> None:
    from engine.model.spec import build_spec

    start = time.monotonic()
    _progress(f"reading {ckpt.path} ({ckpt.family}, d_model {ckpt.shape.d_model})")
    spec = build_spec(ckpt)
    try:
        spec.validate()
        _progress(f"quantizing to {quantization}")
        spec.optimize(quantization=quantization)
        _progress(f"saving to {staging.name}")
        spec.save(str(staging))
    except (ValueError, TypeError) as exc:
        raise ModelError(f"CTranslate2 rejected the converted weights of {ckpt.path}: {exc}") from exc
    _progress(f"converted in {time.monotonic() - start:.1f} s")


def _convert_with_transformers(ckpt: Checkpoint, staging: Path, quantization: str) -> None:
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None:
        raise ModelError(
            f"{ckpt.path} holds only pytorch_model.bin, which needs torch and transformers to read: "
            "install them (`pip install torch transformers`) or provide model.safetensors"
        )
    from ctranslate2.converters import TransformersConverter

    _progress(f"converting {ckpt.path} with CTranslate2's TransformersConverter (pytorch_model.bin)")
    try:
        TransformersConverter(str(ckpt.path)).convert(str(staging), quantization=quantization, force=True)
    except (ValueError, OSError, RuntimeError) as exc:
        raise ModelError(f"converting {ckpt.path} failed: {exc}") from exc


def _manifest(ckpt: Checkpoint, source: str, quantization: str, random_weights: bool) -> Manifest:
    s = ckpt.shape
    return Manifest(
        source=source,
        quantization=quantization,
        family=ckpt.family,
        d_model=s.d_model,
        d_ff=s.d_ff,
        d_kv=s.d_kv,
        num_heads=s.num_heads,
        num_encoder_layers=s.num_layers,
        num_decoder_layers=s.num_decoder_layers,
        vocab_size=s.vocab_size,
        feed_forward=s.feed_forward,
        tied_embeddings=s.tied_embeddings,
        relative_attention_num_buckets=s.relative_attention_num_buckets,
        relative_attention_max_distance=s.relative_attention_max_distance,
        layer_norm_epsilon=s.layer_norm_epsilon,
        pad_token_id=ckpt.pad_token_id,
        eos_token_id=ckpt.eos_token_id,
        decoder_start_token_id=ckpt.decoder_start_token_id,
        max_input_length=ckpt.tokenizer.max_input_length,
        random_weights=random_weights,
    )
