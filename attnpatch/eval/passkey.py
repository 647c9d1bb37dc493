"""Passkey retrieval: a number hidden in repeated filler text, asked for at the end."""

from __future__ import annotations

import random
from dataclasses import dataclass

_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n"
)
_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
_QUESTION = "\nWhat is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeySample:
    prompt: str
    passkey: str
    depth: float

    @property
    def context(self) -> str:
        """The prompt without its closing question (what a reader that takes the question apart reads)."""
        return self.prompt[: -len(_QUESTION)]

    @property
    def question(self) -> str:
        return _QUESTION

    def is_correct(self, answer: str) -> bool:
        """True when the first number in the answer is the passkey."""
        digits = "".join(ch if ch.isdigit() else " " for ch in answer).split()
        return bool(digits) and digits[0] == self.passkey


def passkey_sample(tokenizer, target_tokens: int = 4096, depth: float = 0.5, seed: int = 0) -> PasskeySample:
    """A plain-text passkey prompt of about `target_tokens` tokens with the needle at relative `depth`.

    Plain text (no chat template): SmolLM2-135M-Instruct answers it at 4K with dense attention.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    if target_tokens < 64:
        raise ValueError(f"target_tokens must be >= 64, got {target_tokens}")
    key = str(random.Random(seed).randint(10000, 99999))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    per = len(tokenizer(_FILLER, add_special_tokens=False).input_ids)
    fixed = len(tokenizer(_INTRO + needle + _QUESTION, add_special_tokens=False).input_ids)
    reps = max(1, (target_tokens - fixed) // per)
    before = round(reps * depth)
    prompt = _INTRO + _FILLER * before + needle + _FILLER * (reps - before) + _QUESTION
    return PasskeySample(prompt, key, depth)


def suite_passkey_sample(tokenizer, length: int, index: int, limit: int) -> PasskeySample:
    """Prompt `index` of the evaluation suite's `limit` passkey prompts for a `length`-token context:
    seed `1000 + index`, needle depth `(index + 0.5) / limit`, 16 tokens left for the answer."""
    return passkey_sample(tokenizer, target_tokens=length - 16, depth=(index + 0.5) / limit, seed=1000 + index)
