"""Perplexity of one window of text under a (patched) model: every logit comes from the prefill."""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def window_perplexity(model, tokenizer, text: str, length: int, offset: int = 0) -> float:
    """exp(mean next-token NLL) over `length` tokens of `text` starting at token `offset`."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[:, offset : offset + length]
    if ids.shape[1] < length:
        raise ValueError(f"text has only {ids.shape[1]} tokens after offset {offset}; {length} asked")
    ids = ids.to(model.device)
    logits = model(ids, use_cache=False).logits.float()
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="mean")
    return math.exp(float(nll))
