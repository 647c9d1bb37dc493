"""Per-page log-sum-exp of one decode query's scores, `[B, Hkv, G, n]`: `log Σ_{j∈p, visible} exp(σ·q·k_j)`
for every page `p` and each of a KV head's G query heads. Softmaxed over the pages, a head's row is each
page's share of its attention mass (Recycled Attention's ranking). The fused Triton kernel
(`page_lse_triton`) runs where it can (under torch.compile as the custom op `attnpatch::page_lse`); the
torch path (`attnpatch.backends.reference.page_lse`) is its reference and the fallback."""

from __future__ import annotations

import torch

from attnpatch.backends.reference.page_lse import page_lse_torch
from attnpatch.estimators import page_lse_triton
from attnpatch.estimators.page_lse_op import page_lse_op
from attnpatch.sparsity import KeyBounds

__all__ = ["page_lse", "page_lse_torch"]


def _kernel_reason(query: torch.Tensor, key: torch.Tensor, page_size: int, bounds: KeyBounds) -> str | None:
    if bounds.mask is not None or bounds.window is not None:
        return "a tensor mask or a sliding window (the kernel takes left padding and per-key validity)"
    return page_lse_triton.unsupported_reason(query, key, page_size)


def page_lse(query: torch.Tensor, key: torch.Tensor, page_size: int, scale: float, bounds: KeyBounds | None = None,
             flag: torch.Tensor | None = None, use_kernel: bool | None = None) -> torch.Tensor:
    """The per-page log-sum-exp over the keys `bounds` lets the decode query (the last position) see.
    `flag` (1-element int tensor): the kernel skips its work when it reads 0 and leaves the output unwritten
    (the torch path always computes). `use_kernel`: None runs the kernel when it takes the inputs, False
    never, True raises when it cannot."""
    bounds = KeyBounds() if bounds is None else bounds
    reason = "not requested" if use_kernel is False else _kernel_reason(query, key, page_size, bounds)
    if reason is None:
        if torch.compiler.is_compiling():
            return page_lse_op(query, key, page_size, float(scale), bounds.key_start, bounds.key_valid, flag)
        return page_lse_triton.page_lse_triton(query, key, page_size, scale, bounds.key_start, bounds.key_valid,
                                               flag)
    if use_kernel:
        raise ValueError(f"page_lse: the Triton kernel cannot run: {reason}")
    b, length = query.shape[0], key.shape[2]
    visible = None if bounds.is_plain else bounds.decode_visible(b, length, query.device)
    return page_lse_torch(query, key, page_size, scale, visible)
