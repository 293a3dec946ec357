"""Times Transformers' own generate() for bench_contrastive.py (run with .venv-ref's Python: 4.55.x).

Loads the checkpoint once, then answers one JSON line per request on stdin with one JSON line on
stdout, so that the benchmark can interleave its runs with ours:
  {"input_ids": [[...], ...], "params": {...}}  ->  {"seconds": s, "lengths": [n, ...]}
The first line it writes is {"ready": true, "transformers": "<version>", "threads": n}.

    python hf_contrastive_timer.py HF_DIR THREADS [DEVICE [DTYPE]]   (default: cpu float32)
bench_cuda.py runs it with cuda and float16; the clock then stops after torch.cuda.synchronize().
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    import torch
    import transformers
    from transformers import T5ForConditionalGeneration

    model_dir, threads = sys.argv[1], int(sys.argv[2])
    device = sys.argv[3] if len(sys.argv) > 3 else "cpu"
    dtype = getattr(torch, sys.argv[4] if len(sys.argv) > 4 else "float32")
    torch.set_num_threads(threads)
    model = T5ForConditionalGeneration.from_pretrained(model_dir, torch_dtype=dtype).to(device)
    model.eval()

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    print(
        json.dumps(
            {"ready": True, "transformers": transformers.__version__, "threads": threads, "device": device}
        ),
        flush=True,
    )
    for line in sys.stdin:
        request = json.loads(line)
        batch = request["input_ids"]
        width = max(len(ids) for ids in batch)
        input_ids = torch.tensor([ids + [0] * (width - len(ids)) for ids in batch], device=device)
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in batch], device=device)
        sync()
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=mask, **request["params"])
        sync()
        seconds = time.perf_counter() - start
        print(json.dumps({"seconds": seconds, "lengths": [len(row) - 1 for row in out.tolist()]}), flush=True)


if __name__ == "__main__":
    main()
