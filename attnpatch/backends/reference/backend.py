"""The reference backend as a `Backend`: takes every input (any device, any mask), exact."""

from __future__ import annotations

from attnpatch.backends.base import Backend
from attnpatch.backends.reference.executors import (
    block_sparse_attention,
    paged_decode_attention,
    token_gather_attention,
)
from attnpatch.sparsity import BlockSelection, TokenSelection


class ReferenceBackend(Backend):
    name = "reference"
    description = "exact PyTorch, any device and mask, memory O(L · kept blocks), differentiable"

    def prefill_reason(self, query, key, value, selection, bounds):
        return None

    def prefill(self, query, key, value, selection, *, scale, bounds, tile_counts=None):
        if isinstance(selection, TokenSelection):
            if tile_counts is not None:
                tile_counts[0] += selection.counts.sum()
            return token_gather_attention(query, key, value, selection, scale=scale, bounds=bounds)
        assert isinstance(selection, BlockSelection)
        return block_sparse_attention(query, key, value, selection, scale=scale, bounds=bounds,
                                      tile_counts=tile_counts)

    def decode_reason(self, query, key, value, selection, bounds):
        return None

    def decode(self, query, key, value, selection, *, scale, bounds, tile_counts=None):
        return paged_decode_attention(query, key, value, selection, scale=scale, bounds=bounds,
                                      tile_counts=tile_counts)
