"""The reference backend as a `Backend`: takes every input (any device, any mask), exact. On the CPU, block
selections without a skip rule run as chunked token masks through SDPA (`masked_sdpa`): the same result, 2–3×
faster than the gather executor."""

from __future__ import annotations

import torch

from attnpatch.backends.base import Backend, page_lse_skip_reason
from attnpatch.backends.reference import masked_sdpa
from attnpatch.backends.reference.executors import (
    block_sparse_attention,
    paged_decode_attention,
    token_gather_attention,
)
from attnpatch.backends.reference.page_lse import listed_page_lse
from attnpatch.sparsity import BlockSelection, TokenSelection


def _needs_grad(*tensors) -> bool:
    """Whether autograd will differentiate through the call (the gather executor's zero-gradient rows for
    rows that see no key are kept)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class ReferenceBackend(Backend):
    name = "reference"
    description = ("exact PyTorch, any device and mask, memory O(L · kept blocks), differentiable; on the CPU, "
                   "block selections as chunked token masks through SDPA")

    def prefill_reason(self, query, key, value, selection, bounds):
        return None

    def prefill(self, query, key, value, selection, *, scale, bounds, tile_counts=None):
        if isinstance(selection, TokenSelection):
            if tile_counts is not None:
                tile_counts[0] += selection.counts.sum()
            return token_gather_attention(query, key, value, selection, scale=scale, bounds=bounds)
        assert isinstance(selection, BlockSelection)
        if masked_sdpa.unsupported_reason(query, selection) is None and not _needs_grad(query, key, value):
            if tile_counts is not None:
                tile_counts[0] += selection.counts.sum()
            return masked_sdpa.masked_sdpa_attention(query, key, value, selection, scale, bounds)
        return block_sparse_attention(query, key, value, selection, scale=scale, bounds=bounds,
                                      tile_counts=tile_counts)

    def decode_reason(self, query, key, value, selection, bounds):
        return None

    def decode(self, query, key, value, selection, *, scale, bounds, tile_counts=None):
        return paged_decode_attention(query, key, value, selection, scale=scale, bounds=bounds,
                                      tile_counts=tile_counts)

    def decode_page_lse_reason(self, query, key, value, selection, bounds):
        return page_lse_skip_reason(selection)

    def decode_page_lse(self, query, key, value, selection, *, scale, bounds):
        out = paged_decode_attention(query, key, value, selection, scale=scale, bounds=bounds)
        visible = None if bounds.is_plain else bounds.decode_visible(query.shape[0], key.shape[2], query.device)
        return out, listed_page_lse(query, key, selection, scale, visible)
