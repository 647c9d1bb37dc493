"""`dense` prefill: exactly the unpatched model's attention."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from attnpatch.methods.base import PrefillMethod
from attnpatch.registry import register_prefill


@register_prefill("dense")
@dataclass
class DensePrefill(PrefillMethod):
    """Exact attention through transformers' SDPA path; logits identical to the unpatched model."""

    is_dense: ClassVar[bool] = True
