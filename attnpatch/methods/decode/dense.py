"""`dense` decode: every cached key, exactly as the unpatched model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from attnpatch.methods.base import DecodeMethod
from attnpatch.registry import register_decode


@register_decode("dense")
@dataclass
class DenseDecode(DecodeMethod):
    """Exact attention over the whole cache through transformers' SDPA path."""

    is_dense: ClassVar[bool] = True
