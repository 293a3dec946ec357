"""Demo models: FLAN-T5's real shapes with random weights, built offline and without torch.

They exist because real weights cannot be downloaded on machines without internet. Everything is
deterministic for a seed: the same seed gives the same Hugging Face checkpoint and the same
converted ``model.bin``, byte for byte. The tokenizer is a sentencepiece model trained from a text
the project ships (``engine/model/data``; ``scripts/build_demo_tokenizer.py`` rebuilds it).
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from engine.errors import InvalidRequest, ModelError
from engine.model.manifest import QUANTIZATIONS, TOKENIZER_NAME, Manifest
from engine.model.safetensors_io import TensorPlan, write_safetensors
from engine.model.shapes import T5Shape, preset

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent / "data"
DEMO_CORPUS = DATA_DIR / "demo_corpus.txt"
DEMO_SPIECE = DATA_DIR / "demo_spiece.model"
DEMO_VOCAB_PIECES = 8000  # sentencepiece pieces; the model's vocabulary is padded to 32128
EXTRA_IDS = 100  # T5's sentinels <extra_id_0..99>, right after the sentencepiece pieces
MODEL_MAX_LENGTH = 512
# Rows of the output layer past the sentencepiece pieces (sentinels and padding) get this much of
# the usual scale: a random model then still writes real pieces, not ids that decode to nothing.
UNUSED_ROW_SCALE = 0.01
TIED_EMBEDDING_STD = 0.1


def train_demo_tokenizer(corpus: Path, output: Path, vocab_size: int = DEMO_VOCAB_PIECES) -> Path:
    """Train T5's kind of sentencepiece model (unigram; pad 0, eos 1, unk 2; no bos), deterministically."""
    import sentencepiece as spm

    # Sentences come from an iterator and the model is written to memory: the trainer would
    # otherwise record the input and output paths inside the model, and the bytes would differ
    # from one folder to another.
    model = io.BytesIO()
    with corpus.open(encoding="utf-8") as lines:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=(line.rstrip("\n") for line in lines),
            model_writer=model,
            vocab_size=vocab_size,
            model_type="unigram",
            pad_id=0,
            eos_id=1,
            unk_id=2,
            bos_id=-1,
            pad_piece="<pad>",
            eos_piece="</s>",
            unk_piece="<unk>",
            character_coverage=1.0,
            # One thread and no sampling of the input: the same corpus gives the same model.
            num_threads=1,
            shuffle_input_sentence=False,
            input_sentence_size=0,
            minloglevel=2,
        )
    output.write_bytes(model.getvalue())
    return output


def demo_tokenizer_path() -> Path:
    if not DEMO_SPIECE.is_file():
        raise ModelError(
            f"{DEMO_SPIECE} is missing from the installation; rebuild it with "
            "`python scripts/build_demo_tokenizer.py`"
        )
    return DEMO_SPIECE


def _sp_piece_count(spiece: Path) -> int:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    sp.Load(str(spiece))
    return int(sp.GetPieceSize())


def write_tokenizer_files(out_dir: Path, spiece: Path, *, extra_ids: int = EXTRA_IDS) -> None:
    """spiece.model plus the files Transformers' T5Tokenizer reads, as FLAN-T5's checkpoints have them."""
    shutil.copyfile(spiece, out_dir / TOKENIZER_NAME)
    sentinels = [f"<extra_id_{i}>" for i in range(extra_ids)]
    special = {
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "additional_special_tokens": sentinels,
    }
    tokenizer_config = {
        **special,
        "tokenizer_class": "T5Tokenizer",
        "extra_ids": extra_ids,
        "model_max_length": MODEL_MAX_LENGTH,
        "sp_model_kwargs": {},
        # FLAN-T5's files leave this unset, which means legacy=True in Transformers; saying so
        # keeps the behaviour and silences Transformers' warning about it.
        "legacy": True,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def _tensor_plans(shape: T5Shape, seed: int, sp_pieces: int) -> list[TensorPlan]:
    """Every tensor of T5ForConditionalGeneration's checkpoint, with its random initialization.

    Scales keep activations near unit size whatever the shape (T5's own scheme: attention scores
    are not divided by sqrt(d_kv), so the queries carry that factor), so that logits are spread
    and greedy choices are not near-ties that float rounding could flip between implementations.
    """
    rng = np.random.Generator(np.random.PCG64(seed))
    plans: list[TensorPlan] = []

    def normal(name: str, dims: tuple[int, ...], std: float) -> None:
        # Values are drawn when the writer asks, in plan order: deterministic for the seed.
        plans.append(
            TensorPlan(name, dims, lambda: rng.standard_normal(dims, dtype=np.float32) * np.float32(std))
        )

    def norm_weight(name: str) -> None:
        # Not all ones: a gamma read into the wrong layer norm must change the outputs.
        plans.append(
            TensorPlan(
                name, (shape.d_model,), lambda: 1 + rng.standard_normal(shape.d_model, dtype=np.float32) * 0.1
            )
        )

    def output_rows(name: str, std: float) -> None:
        def make() -> np.ndarray:
            w = rng.standard_normal((shape.vocab_size, shape.d_model), dtype=np.float32) * np.float32(std)
            w[sp_pieces:] *= np.float32(UNUSED_ROW_SCALE)
            return w

        plans.append(TensorPlan(name, (shape.vocab_size, shape.d_model), make))

    d, inner = shape.d_model, shape.inner_dim

    def attention(prefix: str, relative_bias: bool) -> None:
        normal(f"{prefix}.q.weight", (inner, d), (d * shape.d_kv) ** -0.5)
        normal(f"{prefix}.k.weight", (inner, d), d**-0.5)
        normal(f"{prefix}.v.weight", (inner, d), d**-0.5)
        normal(f"{prefix}.o.weight", (d, inner), inner**-0.5)
        if relative_bias:
            normal(
                f"{prefix}.relative_attention_bias.weight",
                (shape.relative_attention_num_buckets, shape.num_heads),
                1.0,
            )

    def feed_forward(prefix: str) -> None:
        if shape.gated:
            normal(f"{prefix}.DenseReluDense.wi_0.weight", (shape.d_ff, d), d**-0.5)
            normal(f"{prefix}.DenseReluDense.wi_1.weight", (shape.d_ff, d), d**-0.5)
        else:
            normal(f"{prefix}.DenseReluDense.wi.weight", (shape.d_ff, d), d**-0.5)
        normal(f"{prefix}.DenseReluDense.wo.weight", (d, shape.d_ff), shape.d_ff**-0.5)
        norm_weight(f"{prefix}.layer_norm.weight")

    # The embeddings are shared by encoder and decoder; unit scale, as T5 does not scale them.
    # Tied to lm_head (original T5), they are smaller: the decoder's residual stream carries the
    # last token's embedding, and at unit scale its dot product with itself dominates the logits,
    # so a random model repeats its last token forever. The unused rows are damped here then.
    if shape.tied_embeddings:
        output_rows("shared.weight", TIED_EMBEDDING_STD)
    else:
        normal("shared.weight", (shape.vocab_size, d), 1.0)
    for i in range(shape.num_layers):
        p = f"encoder.block.{i}.layer"
        attention(f"{p}.0.SelfAttention", relative_bias=i == 0)
        norm_weight(f"{p}.0.layer_norm.weight")
        feed_forward(f"{p}.1")
    norm_weight("encoder.final_layer_norm.weight")
    for i in range(shape.num_decoder_layers):
        p = f"decoder.block.{i}.layer"
        attention(f"{p}.0.SelfAttention", relative_bias=i == 0)
        norm_weight(f"{p}.0.layer_norm.weight")
        attention(f"{p}.1.EncDecAttention", relative_bias=False)
        norm_weight(f"{p}.1.layer_norm.weight")
        feed_forward(f"{p}.2")
    norm_weight("decoder.final_layer_norm.weight")
    if not shape.tied_embeddings:
        output_rows("lm_head.weight", d**-0.5)
    return plans


def write_hf_checkpoint(
    out_dir: str | Path, shape: T5Shape, seed: int, *, spiece: Path | None = None
) -> Path:
    """A Hugging Face T5 checkpoint folder with random weights, deterministic for ``seed``, without torch.

    config.json, generation_config.json, model.safetensors, spiece.model and the tokenizer files:
    ``T5ForConditionalGeneration.from_pretrained`` and ``T5Tokenizer`` load it as they load FLAN-T5.
    """
    if seed < 0:
        raise InvalidRequest(f"seed must be >= 0, got {seed}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spiece = spiece or demo_tokenizer_path()
    sp_pieces = _sp_piece_count(spiece)
    if sp_pieces + EXTRA_IDS > shape.vocab_size:
        raise InvalidRequest(
            f"vocab_size {shape.vocab_size} is smaller than the tokenizer's {sp_pieces} pieces + {EXTRA_IDS} sentinels"
        )
    (out / "config.json").write_text(json.dumps(shape.to_hf_config(), indent=2, sort_keys=True) + "\n")
    generation = {"decoder_start_token_id": 0, "eos_token_id": 1, "pad_token_id": 0}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    write_tokenizer_files(out, spiece)
    write_safetensors(out / "model.safetensors", _tensor_plans(shape, seed, sp_pieces))
    return out


def build_demo_model(
    output: str | Path,
    *,
    size: str = "small",
    seed: int = 0,
    quantization: str = "int8",
    hf_output: str | Path | None = None,
    force: bool = False,
    shape: T5Shape | None = None,
) -> Manifest:
    """Write a random-weight model folder with FLAN-T5's ``size`` shapes (``shape`` overrides, for tests).

    The Hugging Face checkpoint goes to ``hf_output`` (kept, so the reference can load the same
    weights) or to a temporary folder, and is converted with the project's own converter.
    """
    from engine.model.convert import convert_checkpoint, prepare_output

    if quantization not in QUANTIZATIONS:
        raise InvalidRequest(
            f"unknown quantization {quantization!r}; choose one of {', '.join(QUANTIZATIONS)}"
        )
    model_shape = shape or preset(size)
    output = Path(output)
    prepare_output(output, force=force)
    if hf_output is not None:
        prepare_output(Path(hf_output), force=force)
    source = f"demo:{size if shape is None else 'custom'}:seed={seed}"
    with tempfile.TemporaryDirectory(prefix="engine-demo-") as tmp:
        hf_dir = Path(hf_output) if hf_output is not None else Path(tmp) / "hf"
        _progress(f"writing random {size} weights (seed {seed}) to {hf_dir}")
        hf_staging = hf_dir.with_name(f".{hf_dir.name}.partial") if hf_output is not None else hf_dir
        if hf_staging != hf_dir and hf_staging.exists():
            shutil.rmtree(hf_staging)
        try:
            write_hf_checkpoint(hf_staging, model_shape, seed)
            if hf_staging != hf_dir:
                if hf_dir.exists():
                    shutil.rmtree(hf_dir)
                hf_staging.rename(hf_dir)
        finally:
            if hf_staging != hf_dir and hf_staging.exists():
                shutil.rmtree(hf_staging)
        manifest = convert_checkpoint(
            hf_dir, output, quantization=quantization, source=source, random_weights=True, force=force
        )
    log.warning("demo model at %s has RANDOM weights: its outputs are not meaningful text", output)
    return manifest


def _progress(message: str) -> None:
    print(f"[engine] {message}", file=sys.stderr, flush=True)
