"""Reference log-probabilities from Hugging Face Transformers (run with .venv-ref's Python).

Reads a JSON request on stdin; for each case, runs the checkpoint teacher-forced on the decoder
input ``[decoder start] + ids`` (the ids a generation produced) and writes, per generated id, the
log-softmax of the raw logits of its step (before any logits processor), as the engine's
``TokenLogprob`` reports them:

  {"model": "<HF checkpoint folder>", "cases": [{"input_ids": [...], "ids": [...], "top": 5}, ...]}
  -> {"transformers": "4.55.4", "outputs": [{"logprobs": [...], "top": [[[id, lp], ...], ...]}, ...]}

``top``: how many of the most likely ids of each step to return with theirs (most likely first).
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    import torch
    import transformers
    from transformers import T5ForConditionalGeneration

    request = json.load(sys.stdin)
    torch.set_num_threads(int(request.get("threads", 2)))
    model = T5ForConditionalGeneration.from_pretrained(request["model"], torch_dtype=torch.float32)
    model.eval()
    start = model.config.decoder_start_token_id
    outputs = []
    for case in request["cases"]:
        ids = list(case["ids"])
        input_ids = torch.tensor([case["input_ids"]])
        decoder_ids = torch.tensor([[start, *ids[:-1]]]) if ids else torch.tensor([[start]])
        with torch.no_grad():
            logits = model(input_ids=input_ids, decoder_input_ids=decoder_ids).logits[0]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        top_n = int(case.get("top", 0))
        chosen = [float(logprobs[i, t]) for i, t in enumerate(ids)]
        top = []
        for i in range(len(ids)):
            values, indices = torch.topk(logprobs[i], top_n) if top_n else (torch.empty(0), torch.empty(0))
            top.append([[int(j), float(v)] for j, v in zip(indices.tolist(), values.tolist(), strict=True)])
        outputs.append({"logprobs": chosen, "top": top})
    json.dump({"transformers": transformers.__version__, "outputs": outputs}, sys.stdout)


if __name__ == "__main__":
    main()
