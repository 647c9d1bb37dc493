"""`dense`: the reference — exactly the unpatched model's SDPA attention."""

from __future__ import annotations

from dataclasses import dataclass

from attnpatch.methods.base import DecodeMethod, PrefillMethod
from attnpatch.registry import register_method


@register_method("dense", ("prefill", "decode"))
@dataclass
class Dense(PrefillMethod, DecodeMethod):
    """Exact attention through transformers' SDPA path; logits identical to the unpatched model."""

    @property
    def is_dense(self) -> bool:
        return True
