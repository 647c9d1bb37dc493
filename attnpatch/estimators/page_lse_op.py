"""The per-page log-sum-exp kernel as a torch custom op, `attnpatch::page_lse`: a compiled decode step
keeps the launch inside one graph (shape-only fake; CUDA-graph capturable: no host sync, no allocation
but the output). Eager calls use `page_lse_triton` directly (same code)."""

# No `from __future__ import annotations`: `custom_op` reads the schema from real annotations.
from typing import Optional

import torch

from attnpatch.estimators.page_lse_triton import page_lse_triton
from attnpatch.sparsity import num_blocks

__all__ = ["page_lse_op"]


@torch.library.custom_op("attnpatch::page_lse", mutates_args=())
def page_lse_op(query: torch.Tensor, key: torch.Tensor, page_size: int, scale: float,
                key_start: Optional[torch.Tensor], key_valid: Optional[torch.Tensor],  # noqa: UP045
                flag: Optional[torch.Tensor]) -> torch.Tensor:  # noqa: UP045
    """`page_lse_triton` as an op a compiled decode step can hold."""
    return page_lse_triton(query, key, page_size, scale, key_start, key_valid, flag)


@page_lse_op.register_fake
def _page_lse_fake(query, key, page_size, scale, key_start, key_valid, flag):
    b, hq = query.shape[0], query.shape[1]
    hkv = key.shape[1]
    return query.new_empty(b, hkv, hq // hkv, num_blocks(key.shape[2], page_size), dtype=torch.float32)
