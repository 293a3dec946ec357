"""Contenders that bench_contrastive.py (CPU) and bench_cuda.py (GPU) time side by side:
Transformers' contrastive search in a kept-alive subprocess, CTranslate2 greedy, and their inputs."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import ctranslate2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def forced_prompts(batch: int, tokens: int) -> list[list[int]]:
    """``batch`` prompts of ``tokens`` ids (EOS last), the same for a given batch size."""
    rng = np.random.default_rng(batch)
    return [[*(int(i) for i in rng.integers(3, 30000, size=tokens - 1)), 1] for _ in range(batch)]


class TransformersTimer:
    """Transformers' generate() in another Python (``hf_contrastive_timer.py``: 4.55.x for
    contrastive search), kept alive so that its runs interleave with ours."""

    def __init__(
        self, python: str | Path, hf_dir: Path, threads: int, device: str = "cpu", dtype: str = "float32"
    ) -> None:
        script = ROOT / "benchmarks" / "hf_contrastive_timer.py"
        self.proc = subprocess.Popen(
            [str(python), str(script), str(hf_dir), str(threads), device, dtype],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.info = self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the Transformers timer exited; see its stderr above")
        out: dict[str, Any] = json.loads(line)
        return out

    def run(self, batch: list[list[int]], params: dict[str, Any]) -> float:
        """Seconds for one generate() call; every row must get exactly max_new_tokens."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"input_ids": batch, "params": params}) + "\n")
        self.proc.stdin.flush()
        out = self._read()
        assert all(n == params["max_new_tokens"] for n in out["lengths"]), out
        return float(out["seconds"])

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


def ct2_greedy(
    translator: ctranslate2.Translator, vocab: list[str], batch: list[list[int]], new_tokens: int
) -> float:
    """Seconds for CTranslate2 greedy with exactly ``new_tokens`` tokens per row."""
    source = [[vocab[i] for i in ids] for ids in batch]
    start = time.perf_counter()
    out = translator.translate_batch(
        source, beam_size=1, max_decoding_length=new_tokens, min_decoding_length=new_tokens
    )
    seconds = time.perf_counter() - start
    assert all(len(r.hypotheses[0]) == new_tokens for r in out)
    return seconds
