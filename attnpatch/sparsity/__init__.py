"""Sparsity as data: block, token and page selections, skip rules, and the operations on them."""

from attnpatch.sparsity.selection import (
    BlockSelection,
    PageSelection,
    SkipRule,
    TokenSelection,
    causal_block_limit,
    num_blocks,
)

__all__ = ["BlockSelection", "PageSelection", "SkipRule", "TokenSelection", "causal_block_limit", "num_blocks"]
