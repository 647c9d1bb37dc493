"""Sparsity as data: block, token and page selections, skip rules, key bounds (padding, windows),
the regions and selectors prefill methods share, and the one full/partial split executors use."""

from attnpatch.sparsity.bounds import KeyBounds
from attnpatch.sparsity.selection import (
    BlockSelection,
    BoundPages,
    PageSelection,
    SkipRule,
    TokenSelection,
    causal_block_limit,
    num_blocks,
)

__all__ = ["BlockSelection", "BoundPages", "KeyBounds", "PageSelection", "SkipRule", "TokenSelection",
           "causal_block_limit", "num_blocks"]
