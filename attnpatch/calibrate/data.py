"""Calibration prompts: built-in offline sets or the user's JSONL, as token ids of a given length.

Built-in sets are disjoint from the evaluation suite's prompts: `text` takes windows of Austen novels
other than Pride and Prejudice (the suite's perplexity text), `passkey` uses seeds the suite never uses,
`mixed` alternates the two (text first), so thresholds are fitted on prose and on retrieval prompts alike.
`calibration_ids` gives the prompts (what threshold calibration records Q/K/V on);
`calibration_samples` also appends each prompt's answer (passkey, a JSONL row's `answer`) and marks it as
what a loss should count (HeSS's gradients).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

BUILT_IN = ("text", "passkey", "mixed")
_NOVELS = ("emma", "persuasion", "mansfieldpark", "sensesensibility", "northangerabbey")
_PASSKEY_SEED = 90_000  # the suite uses 1000 + i and 7


def _jsonl_rows(path: Path) -> list[tuple[str, str | None]]:
    """`(text, answer)` per row: `text`, or `prompt` with its optional `answer`."""
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n} is not JSON: {e}") from e
        if not isinstance(row, dict) or not ({"text"} <= set(row) or {"prompt"} <= set(row)):
            raise ValueError(f"{path}:{n} must be an object with 'text', or 'prompt' (and 'answer'); got {line[:80]!r}")
        if "text" in row:
            rows.append((str(row["text"]), None))
        else:
            rows.append((str(row["prompt"]), None if row.get("answer") is None else str(row["answer"])))
    if not rows:
        raise ValueError(f"{path} has no samples")
    return rows


def _jsonl_texts(path: Path) -> list[str]:
    return [text for text, _ in _jsonl_rows(path)]


@dataclass(frozen=True)
class CalibrationSample:
    """Token ids `[1, L]` and the first position whose token a loss counts (0: every token; else the
    answer's first token)."""

    ids: torch.Tensor
    loss_from: int = 0


def _with_answer(tokenizer, prompt_ids: torch.Tensor, answer: str, length: int) -> CalibrationSample:
    answer_ids = tokenizer(" " + answer.strip(), add_special_tokens=False, return_tensors="pt").input_ids
    keep = length - answer_ids.shape[1]
    if keep < 1:
        raise ValueError(f"an answer of {answer_ids.shape[1]} tokens does not fit {length} tokens")
    ids = torch.cat([prompt_ids[:, -keep:], answer_ids], 1)
    return CalibrationSample(ids, ids.shape[1] - answer_ids.shape[1])


def _interleave(first: list, second: list) -> list:
    """first[0], second[0], first[1], ... (first may be one longer)."""
    out = []
    for i, x in enumerate(first):
        out.append(x)
        if i < len(second):
            out.append(second[i])
    return out


def calibration_samples(tokenizer, data: str, samples: int, length: int) -> list[CalibrationSample]:
    """As `calibration_ids`, but a prompt with an answer (every `passkey` prompt, a JSONL row with
    `prompt` and `answer`) keeps its last tokens and ends with the answer, within `length` tokens, and
    `loss_from` marks the answer; other samples (`text`, JSONL `text`) count every token."""
    if data == "mixed":
        return _interleave(calibration_samples(tokenizer, "text", (samples + 1) // 2, length),
                           calibration_samples(tokenizer, "passkey", samples // 2, length) if samples > 1 else [])
    if data == "passkey":
        from attnpatch.eval.passkey import passkey_sample

        out = []
        for i in range(samples):
            s = passkey_sample(tokenizer, target_tokens=length, depth=(i + 0.5) / samples, seed=_PASSKEY_SEED + i)
            out.append(_with_answer(tokenizer, tokenizer(s.prompt, return_tensors="pt").input_ids, s.passkey, length))
        return out
    path = Path(data)
    if data in BUILT_IN or not path.is_file():
        return [CalibrationSample(ids) for ids in calibration_ids(tokenizer, data, samples, length)]
    out = []
    for text, answer in _jsonl_rows(path):
        ids = tokenizer(text, return_tensors="pt").input_ids
        if answer is not None:
            out.append(_with_answer(tokenizer, ids, answer, length))
        elif ids.shape[1] >= length:
            out.append(CalibrationSample(ids[:, :length]))
        if len(out) == samples:
            return out
    raise ValueError(f"{path} has {len(out)} sample(s) of at least {length} tokens (or with an answer); "
                     f"{samples} asked")


def calibration_ids(tokenizer, data: str, samples: int, length: int) -> list[torch.Tensor]:
    """`samples` prompts of `length` tokens (`[1, length]` each) from `data`: "text", "passkey", "mixed"
    or a JSONL path (texts shorter than `length` are refused; longer ones are cut)."""
    if samples < 1 or length < 1:
        raise ValueError(f"samples and length must be positive, got {samples}, {length}")
    if data == "mixed":
        return _interleave(calibration_ids(tokenizer, "text", (samples + 1) // 2, length),
                           calibration_ids(tokenizer, "passkey", samples // 2, length) if samples > 1 else [])
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
