"""Times Transformers' own generate() for the benchmarks; run with .venv-ref's Python (Transformers
4.55.x, which still has contrastive search). Never imported by the project: benchmarks start it as a
subprocess (``TransformersTimer`` in benchmarks/suite/contenders.py) and talk JSON lines over
stdin/stdout, so that its runs interleave with ours.

    python hf_timer.py HF_DIR [THREADS [DEVICE [DTYPE]]]     (default: torch's threads, cpu, float32)
    <- {"ready": true, "transformers": "...", "torch": "...", "threads": n, "device": "cpu"}
    -> {"input_ids": [[...], ...], "params": {...}, "threads": n}   (threads optional)
    <- {"seconds": s, "lengths": [new tokens per row]}

``threads`` sets torch's intra-op threads for that call: on a busy 2-core machine one thread can
be ten times faster than two (every parallel region waits for a thread that is not scheduled),
so the suite tries both at warm-up and keeps the faster, giving the baseline its best setting.
On cuda (bench_cuda.py: float16) the clock stops after torch.cuda.synchronize().
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    import torch
    import transformers
    from transformers import T5ForConditionalGeneration

    model_dir = sys.argv[1]
    if len(sys.argv) > 2:
        torch.set_num_threads(int(sys.argv[2]))
    device = sys.argv[3] if len(sys.argv) > 3 else "cpu"
    dtype = getattr(torch, sys.argv[4] if len(sys.argv) > 4 else "float32")
    model = T5ForConditionalGeneration.from_pretrained(model_dir, torch_dtype=dtype).to(device).eval()

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    hello = {"ready": True, "transformers": transformers.__version__, "torch": torch.__version__}
    print(json.dumps({**hello, "threads": torch.get_num_threads(), "device": device}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if "threads" in request:
            torch.set_num_threads(int(request["threads"]))
        rows = request["input_ids"]
        width = max(len(ids) for ids in rows)
        input_ids = torch.tensor([ids + [0] * (width - len(ids)) for ids in rows], device=device)
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in rows], device=device)
        sync()
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=mask, **request["params"])
        sync()
        seconds = time.perf_counter() - start
        # Rows start with the decoder-start token. Callers force the length (min_new_tokens) or send
        # one row per call, so there is no padding after an early EOS to subtract.
        lengths = [len(row) - 1 for row in out.tolist()]
        print(json.dumps({"seconds": seconds, "lengths": lengths}), flush=True)


if __name__ == "__main__":
    main()
