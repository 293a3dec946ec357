"""ONNX Runtime int8 as a benchmark peer: the tool CPU users pick for fast T5 (run with .venv-onnx's
Python, made by `make onnx`; never imported by the project, never a runtime dependency).

The same Hugging Face checkpoint the other contenders read is exported with optimum
(``main_export``, task text2text-generation-with-past: an encoder, a first-step decoder and a
decoder that takes the KV cache), each graph quantized with ``ORTQuantizer`` and
``AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=False)`` (int8 dynamic
quantization), written once under OUT_DIR and reused. Generation is our own loop over the three
sessions with the KV cache (greedy; optimum's generate() is not what we time), on ``threads``
intra-op threads. Protocol (JSON lines, as benchmarks/hf_timer.py):

    python onnx_timer.py HF_DIR OUT_DIR THREADS
    <- {"ready": true, "onnxruntime": "...", "optimum_onnx": "...", "threads": n, "quantization": "..."}
    -> {"input_ids": [[...]], "params": {"max_new_tokens": n, "min_new_tokens": n}}
    <- {"seconds": s, "lengths": [new tokens per row]}

Only greedy is implemented (with min_new_tokens: EOS is suppressed until then); other params are
refused with a message.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

GRAPHS = ("encoder_model", "decoder_model", "decoder_with_past_model")
SUPPORTED = {"max_new_tokens", "min_new_tokens", "do_sample", "num_beams"}


def export_int8(hf_dir: Path, out_dir: Path) -> Path:
    """The quantized graphs' folder (exported and quantized on first use)."""
    int8 = out_dir / "int8"
    if all((int8 / f"{g}_quantized.onnx").is_file() for g in GRAPHS):
        return int8
    from optimum.exporters.onnx import main_export  # type: ignore[import-not-found]
    from optimum.onnxruntime import ORTQuantizer  # type: ignore[import-not-found]
    from optimum.onnxruntime.configuration import AutoQuantizationConfig  # type: ignore[import-not-found]

    fp32 = out_dir / "fp32"
    if not all((fp32 / f"{g}.onnx").is_file() for g in GRAPHS):
        main_export(
            str(hf_dir),
            fp32,
            task="text2text-generation-with-past",
            no_post_process=True,
            do_validation=False,
        )
    config = AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=False)
    for graph in GRAPHS:
        ORTQuantizer.from_pretrained(fp32, file_name=f"{graph}.onnx").quantize(
            save_dir=int8, quantization_config=config
        )
    return int8


class Seq2Seq:
    def __init__(self, folder: Path, threads: int, config: dict[str, Any]) -> None:
        import onnxruntime as ort  # type: ignore[import-not-found]

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        providers = ["CPUExecutionProvider"]
        self.encoder, self.first, self.step = (
            ort.InferenceSession(str(folder / f"{g}_quantized.onnx"), options, providers=providers)
            for g in GRAPHS
        )
        self.start_id = int(config.get("decoder_start_token_id", 0))
        self.eos_id = int(config.get("eos_token_id", 1))
        self.layers = int(config.get("num_decoder_layers") or config["num_layers"])

    def generate(self, rows: list[list[int]], max_new: int, min_new: int) -> list[int]:
        """Greedy ids per row (EOS suppressed before ``min_new``); returns each row's new tokens."""
        width = max(len(r) for r in rows)
        input_ids = np.array([r + [0] * (width - len(r)) for r in rows], dtype=np.int64)
        mask = np.array([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=np.int64)
        (hidden,) = self.encoder.run(None, {"input_ids": input_ids, "attention_mask": mask})
        batch = len(rows)
        tokens = np.full((batch, 1), self.start_id, dtype=np.int64)
        outputs = self.first.run(
            None, {"input_ids": tokens, "encoder_attention_mask": mask, "encoder_hidden_states": hidden}
        )
        names = [o.name for o in self.first.get_outputs()]
        past = {
            n.replace("present", "past_key_values"): v for n, v in zip(names[1:], outputs[1:], strict=True)
        }
        logits = outputs[0]
        step_names = [o.name for o in self.step.get_outputs()]
        done = np.zeros(batch, dtype=bool)
        lengths = np.zeros(batch, dtype=np.int64)
        for i in range(max_new):
            scores = logits[:, -1, :]
            if i < min_new:
                scores[:, self.eos_id] = -np.inf
            nxt = scores.argmax(axis=-1)
            lengths += ~done
            done |= nxt == self.eos_id
            if done.all() or i == max_new - 1:
                break
            feed = {
                "input_ids": nxt.reshape(batch, 1).astype(np.int64),
                "encoder_attention_mask": mask,
                **past,
            }
            outputs = self.step.run(None, feed)
            logits = outputs[0]
            for n, v in zip(step_names[1:], outputs[1:], strict=True):
                past[n.replace("present", "past_key_values")] = v  # the decoder's own K/V grow
        return [int(n) for n in lengths]


def main() -> None:
    from importlib.metadata import version

    hf_dir, out_dir, threads = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    config = json.loads((hf_dir / "config.json").read_text())
    model = Seq2Seq(export_int8(hf_dir, out_dir), threads, config)
    hello = {
        "ready": True,
        "onnxruntime": version("onnxruntime"),
        "optimum_onnx": version("optimum-onnx"),
        "threads": threads,
        "quantization": "int8 dynamic (ORTQuantizer, avx512_vnni, per-tensor)",
    }
    print(json.dumps(hello), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        params = request["params"]
        unknown = set(params) - SUPPORTED
        if unknown or params.get("do_sample") or params.get("num_beams", 1) != 1:
            print(
                json.dumps(
                    {"error": f"the ONNX Runtime peer runs greedy only, not {sorted(unknown) or params}"}
                )
            )
            sys.stdout.flush()
            continue
        max_new = int(params.get("max_new_tokens", 64))
        min_new = int(params.get("min_new_tokens", 0))
        start = time.perf_counter()
        lengths = model.generate(request["input_ids"], max_new, min_new)
        seconds = time.perf_counter() - start
        print(json.dumps({"seconds": seconds, "lengths": lengths}), flush=True)


if __name__ == "__main__":
    main()
