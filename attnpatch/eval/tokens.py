"""Tokenizing a text window the way the model saw text in training: with the tokens its tokenizer puts first."""

from __future__ import annotations

import torch


def leading_ids(tokenizer) -> list[int]:
    """The ids the tokenizer puts before a text by default (Gemma: `[<bos>]`; SmolLM2: none)."""
    bare = tokenizer("a", add_special_tokens=False).input_ids
    full = tokenizer("a", add_special_tokens=True).input_ids
    for start in range(len(full) - len(bare) + 1):
        if full[start:start + len(bare)] == bare:
            return list(full[:start])
    return []


def text_window(tokenizer, text: str, length: int, offset: int = 0) -> torch.Tensor:
    """`[1, n]` ids: the tokenizer's leading ids, then `length` tokens of `text` from token `offset` on.

    A model trained with a BOS token is far off without it (Gemma-3-270m: perplexity 64.7 instead of
    16.4 on 512 tokens of Pride and Prejudice), so windows taken from the middle of a tokenized text get
    the leading ids back. ValueError when the text is too short.
    """
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[:, offset:offset + length]
    if ids.shape[1] < length:
        raise ValueError(f"text has only {ids.shape[1]} tokens after offset {offset}; {length} asked")
    lead = leading_ids(tokenizer)
    return torch.cat([torch.tensor([lead], dtype=ids.dtype), ids], dim=1) if lead else ids
