"""Perplexity of one window of text under a (patched) model: every logit comes from the prefill."""

from __future__ import annotations

import math

import torch

from attnpatch.eval.tokens import text_window

LOGIT_ROWS = 2048  # rows of logits at a time (Gemma 3: 262K-entry vocabulary, 2 GiB of fp32 per 2048 rows)


@torch.no_grad()
def window_perplexity(model, tokenizer, text: str, length: int, offset: int = 0) -> float:
    """exp(mean next-token NLL) over `length` tokens of `text` starting at token `offset`, after the
    tokenizer's leading ids (`<bos>` where the model has one; see `text_window`).

    One prefill of the decoder; the LM head (and the final logit soft-capping where the config has one)
    runs over `LOGIT_ROWS` positions at a time, so a 32K window of a 262K-vocabulary model never holds
    its full `[L, vocab]` logits (17 GB in bf16).
    """
    ids = text_window(tokenizer, text, length, offset).to(model.device)
    hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state[0, :-1]
    head = model.get_output_embeddings()
    cap = getattr(getattr(model.config, "get_text_config", lambda: model.config)(), "final_logit_softcapping", None)
    total = 0.0
    for r0 in range(0, hidden.shape[0], LOGIT_ROWS):
        logits = head(hidden[r0 : r0 + LOGIT_ROWS]).float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        total += float(torch.nn.functional.cross_entropy(logits, ids[0, r0 + 1 : r0 + 1 + LOGIT_ROWS], reduction="sum"))
    return math.exp(total / hidden.shape[0])
