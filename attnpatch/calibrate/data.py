"""Calibration prompts: built-in offline sets or the user's JSONL, as token ids of a given length.

Built-in sets are disjoint from the evaluation suite's prompts: `text` takes windows of Austen novels
other than Pride and Prejudice (the suite's perplexity text), `passkey` uses seeds the suite never uses.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

BUILT_IN = ("text", "passkey")
_NOVELS = ("emma", "persuasion", "mansfieldpark", "sensesensibility", "northangerabbey")
_PASSKEY_SEED = 90_000  # the suite uses 1000 + i and 7


def _jsonl_texts(path: Path) -> list[str]:
    texts = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n} is not JSON: {e}") from e
        if not isinstance(row, dict) or not ({"text"} <= set(row) or {"prompt"} <= set(row)):
            raise ValueError(f"{path}:{n} must be an object with 'text', or 'prompt' (and 'answer'); got {line[:80]!r}")
        texts.append(str(row.get("text", row.get("prompt"))))
    if not texts:
        raise ValueError(f"{path} has no samples")
    return texts


def calibration_ids(tokenizer, data: str, samples: int, length: int) -> list[torch.Tensor]:
    """`samples` prompts of `length` tokens (`[1, length]` each) from `data`: "text", "passkey" or a
    JSONL path (texts shorter than `length` are refused; longer ones are cut)."""
    if samples < 1 or length < 1:
        raise ValueError(f"samples and length must be positive, got {samples}, {length}")
    if data == "passkey":
        from attnpatch.eval.passkey import passkey_sample

        out = []
        for i in range(samples):
            s = passkey_sample(tokenizer, target_tokens=length, depth=(i + 0.5) / samples, seed=_PASSKEY_SEED + i)
            out.append(tokenizer(s.prompt, return_tensors="pt").input_ids[:, -length:])
        return out
    if data == "text":
        from attnpatch.eval.texts import austen
        from attnpatch.eval.tokens import leading_ids, text_window

        out = []
        for i in range(samples):
            lead = len(leading_ids(tokenizer))
            try:
                ids = text_window(tokenizer, austen(_NOVELS[i % len(_NOVELS)]), length - lead,
                                  (i // len(_NOVELS)) * length)
            except ValueError:
                raise ValueError(f"not enough text for {samples} samples of {length} tokens") from None
            out.append(ids)
        return out
    path = Path(data)
    if not path.is_file():
        raise ValueError(f"data must be one of {', '.join(BUILT_IN)} or a JSONL file; {data!r} is neither")
    out = []
    for text in _jsonl_texts(path):
        ids = tokenizer(text, return_tensors="pt").input_ids
        if ids.shape[1] >= length:
            out.append(ids[:, :length])
        if len(out) == samples:
            return out
    raise ValueError(f"{path} has {len(out)} sample(s) of at least {length} tokens; {samples} asked")
