"""The ascending top-k selection kernels as torch custom ops, `attnpatch::topk_ascending` and
`attnpatch::group_topk_ascending`, so a compiled
decode step keeps it inside one graph (shape-only fake; no host sync, CUDA-graph capturable). Eager
calls use the `*_triton` functions directly (same code)."""

# No `from __future__ import annotations`: `custom_op` reads the schema from real annotations.
from typing import Optional

import torch

from attnpatch.backends.triton.topk_select import group_topk_ascending_triton, topk_ascending_triton

__all__ = ["group_topk_ascending_op", "topk_ascending_op"]


@torch.library.custom_op("attnpatch::topk_ascending", mutates_args=())
def topk_ascending_op(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`topk_ascending_triton` as an op a compiled decode step can hold."""
    return topk_ascending_triton(scores, k)


@topk_ascending_op.register_fake
def _topk_ascending_fake(scores, k):
    lead = scores.shape[:-1]
    return (scores.new_empty(*lead, k, dtype=torch.int32), scores.new_empty(lead, dtype=torch.int32))


@torch.library.custom_op("attnpatch::group_topk_ascending", mutates_args=())
def group_topk_ascending_op(scores: torch.Tensor, k: int, first: torch.Tensor, end: torch.Tensor, combine: str,
                            keep_last: int, flag: Optional[torch.Tensor] = None,  # noqa: UP045
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """`group_topk_ascending_triton` as an op a compiled decode step can hold."""
    return group_topk_ascending_triton(scores, k, first, end, combine, keep_last, flag)


@group_topk_ascending_op.register_fake
def _group_topk_ascending_fake(scores, k, first, end, combine, keep_last, flag=None):
    b, h = scores.shape[:2]
    return (scores.new_empty(b, h, k, dtype=torch.int32), scores.new_empty(b, h, dtype=torch.int32))
