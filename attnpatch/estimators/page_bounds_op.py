"""The Quest page-bound kernel as a torch custom op, `attnpatch::quest_page_bounds`: a compiled decode
step keeps the launch inside one graph (shape-only fake; CUDA-graph capturable: no host sync, no
allocation but the output). Eager calls use `page_upper_bounds_triton` directly (same code)."""

# No `from __future__ import annotations`: `custom_op` reads the schema from real annotations.
import torch

from attnpatch.estimators.page_bounds_triton import page_upper_bounds_triton

__all__ = ["page_bounds_op"]


@torch.library.custom_op("attnpatch::quest_page_bounds", mutates_args=())
def page_bounds_op(query: torch.Tensor, page_min: torch.Tensor, page_max: torch.Tensor, n: int,
                   scale: float) -> torch.Tensor:
    """`page_upper_bounds_triton` as an op a compiled decode step can hold."""
    return page_upper_bounds_triton(query, page_min, page_max, n, scale)


@page_bounds_op.register_fake
def _page_bounds_fake(query, page_min, page_max, n, scale):
    b, hq = query.shape[0], query.shape[1]
    hkv = page_min.shape[1]
    return query.new_empty(b, hkv, hq // hkv, n, dtype=torch.float32)
