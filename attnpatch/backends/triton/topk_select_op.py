"""The ascending top-k selection kernel as a torch custom op, `attnpatch::topk_ascending`, so a compiled
decode step keeps it inside one graph (shape-only fake; no host sync, CUDA-graph capturable). Eager
calls use `topk_ascending_triton` directly (same code)."""

# No `from __future__ import annotations`: `custom_op` reads the schema from real annotations.
import torch

from attnpatch.backends.triton.topk_select import topk_ascending_triton

__all__ = ["topk_ascending_op"]


@torch.library.custom_op("attnpatch::topk_ascending", mutates_args=())
def topk_ascending_op(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`topk_ascending_triton` as an op a compiled decode step can hold."""
    return topk_ascending_triton(scores, k)


@topk_ascending_op.register_fake
def _topk_ascending_fake(scores, k):
    lead = scores.shape[:-1]
    return (scores.new_empty(*lead, k, dtype=torch.int32), scores.new_empty(lead, dtype=torch.int32))
