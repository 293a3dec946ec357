"""Reference generations from Hugging Face Transformers (run with .venv-ref's Python: 4.55.x).

Reads a JSON request on stdin and writes generated ids on stdout, so that tests (in .venv) can ask
the reference without importing torch/transformers of another version:

  {"model": "<HF checkpoint folder>", "cases": [{"input_ids": [[...], ...], "params": {...}}, ...]}
  -> {"transformers": "4.55.4", "outputs": [[[ids of prompt 0], [ids of prompt 1], ...], ...]}

Input ids are given as the engine tokenizes them (sentencepiece ids + EOS); a batch of mixed
lengths is right-padded with the pad id and masked, as T5Tokenizer(padding=True) would. Output ids
exclude the decoder-start token, the EOS and any padding, as the engine's ``Result.token_ids``.
``params`` are passed to ``generate`` as they are (max_new_tokens, num_beams, penalty_alpha, ...).
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
    cfg = model.config
    pad, eos = cfg.pad_token_id, cfg.eos_token_id
    outputs = []
    for case in request["cases"]:
        batch = case["input_ids"]
        width = max(len(ids) for ids in batch)
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids in batch])
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in batch])
        params = dict(case.get("params", {}))
        seed = params.pop("seed", None)
        if seed is not None:
            torch.manual_seed(seed)
        with torch.no_grad():
            seqs = model.generate(input_ids=input_ids, attention_mask=mask, **params)
        rows = []
        for seq in seqs.tolist():
            out = seq[1:]  # drop the decoder-start token
            if eos in out:
                out = out[: out.index(eos)]
            rows.append(out)
        outputs.append(rows)
    json.dump({"transformers": transformers.__version__, "outputs": outputs}, sys.stdout)


if __name__ == "__main__":
    main()
