"""The reference's contrastive scores at one step (run with .venv-ref's Python: Transformers 4.55.x).

Tests use it to tell a near-tie from a bug where our ids and the reference's differ: given a
prompt and the reference's own generated prefix up to the first differing step, it recomputes that
step as Transformers 4.55's ``_contrastive_search`` / ``_ranking_fast`` do (processed logits ->
softmax -> top k -> each candidate's final hidden state -> max cosine with the context -> score).

  stdin:  {"model": "<HF checkpoint folder>",
           "cases": [{"input_ids": [...], "prefix": [...], "params": {"penalty_alpha": a, "top_k": k, ...}}]}
  stdout: {"transformers": "4.55.4", "outputs": [{"candidates": [ids...], "scores": [floats...]}, ...]}
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    import torch
    import transformers
    from transformers import T5ForConditionalGeneration
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        MinNewTokensLengthLogitsProcessor,
        NoRepeatNGramLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
    )

    request = json.load(sys.stdin)
    torch.set_num_threads(int(request.get("threads", 2)))
    model = T5ForConditionalGeneration.from_pretrained(request["model"], torch_dtype=torch.float32)
    model.eval()
    cfg = model.config
    outputs = []
    for case in request["cases"]:
        params = case["params"]
        alpha, k = float(params["penalty_alpha"]), int(params["top_k"])
        processors = LogitsProcessorList()
        if params.get("repetition_penalty", 1.0) != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(penalty=float(params["repetition_penalty"])))
        if params.get("no_repeat_ngram_size", 0) > 0:
            processors.append(NoRepeatNGramLogitsProcessor(int(params["no_repeat_ngram_size"])))
        if params.get("min_new_tokens", 0) > 0:
            processors.append(
                MinNewTokensLengthLogitsProcessor(1, int(params["min_new_tokens"]), cfg.eos_token_id)
            )
        encoder_ids = torch.tensor([case["input_ids"]])
        decoder_ids = torch.tensor([[cfg.decoder_start_token_id, *case["prefix"]]])
        with torch.no_grad():
            encoded = model.get_encoder()(input_ids=encoder_ids)
            out = model(encoder_outputs=encoded, decoder_input_ids=decoder_ids, output_hidden_states=True)
            context = out.decoder_hidden_states[-1]  # [1, t, d]
            logits = processors(decoder_ids, out.logits[:, -1, :].float())
            probs = torch.nn.functional.softmax(logits, dim=-1)
            top_probs, top_ids = torch.topk(probs, dim=-1, k=k)
            candidates = torch.cat([decoder_ids.repeat(k, 1), top_ids.view(-1, 1)], dim=1)
            hidden = model(
                encoder_outputs=(encoded.last_hidden_state.repeat(k, 1, 1),),
                decoder_input_ids=candidates,
                output_hidden_states=True,
            ).decoder_hidden_states[-1][:, -1:, :]  # [k, 1, d]
            norm_context = context / context.norm(dim=2, keepdim=True)
            norm_next = hidden / hidden.norm(dim=2, keepdim=True)
            cosine = torch.matmul(norm_context.repeat(k, 1, 1), norm_next.transpose(1, 2)).squeeze(-1)
            penalty, _ = torch.max(cosine, dim=-1)
            scores = (1.0 - alpha) * top_probs.view(-1) - alpha * penalty
        outputs.append({"candidates": top_ids.view(-1).tolist(), "scores": scores.tolist()})
    json.dump({"transformers": transformers.__version__, "outputs": outputs}, sys.stdout)


if __name__ == "__main__":
    main()
