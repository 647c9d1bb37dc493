"""Quest's page bound (arXiv 2406.10774): an upper bound of `q·k` over every key of a page from the
page's elementwise key min / max, `Σ_d max(q_d·min_d, q_d·max_d)`, for the G query heads of each KV
head. The fused Triton kernel (`page_bounds_triton`) runs where it can; the torch path is its
reference (float32 GEMMs) and the fallback."""

from __future__ import annotations

import torch

from attnpatch.estimators import page_bounds_triton
from attnpatch.estimators.page_bounds_op import page_bounds_op

__all__ = ["page_upper_bounds", "page_upper_bounds_torch"]


def page_upper_bounds_torch(query: torch.Tensor, page_min: torch.Tensor, page_max: torch.Tensor) -> torch.Tensor:
    """`relu(q)·max + min(q, 0)·min` in float32: query `[B, Hq, 1, D]`, tables `[B, Hkv, n, D]` ->
    `[B, Hkv, G, n]`. (In half precision the GEMM's output is rounded to 8 mantissa bits: ties and a
    coarse ranking of the pages; the kernel keeps float32.)"""
    b, hq, _, d = query.shape
    hkv = page_min.shape[1]
    q = query.reshape(b, hkv, hq // hkv, d).float()
    upper = q.clamp(min=0) @ page_max.float().transpose(-1, -2)
    return upper + q.clamp(max=0) @ page_min.float().transpose(-1, -2)


def page_upper_bounds(query: torch.Tensor, page_min: torch.Tensor, page_max: torch.Tensor, n: int | None = None,
                      scale: float = 1.0, use_kernel: bool | None = None) -> torch.Tensor:
    """`scale ·` the bound of the first `n` pages (default all), `[B, Hkv, G, n]` float32. `use_kernel`:
    None runs the Triton kernel when it takes the inputs, False never, True raises when it cannot. Under
    torch.compile the kernel runs as the custom op `attnpatch::quest_page_bounds`."""
    n = page_min.shape[2] if n is None else n
    reason = "not requested" if use_kernel is False else page_bounds_triton.unsupported_reason(
        query, page_min, page_max)
    if reason is None:
        if torch.compiler.is_compiling():
            return page_bounds_op(query, page_min, page_max, n, float(scale))
        return page_bounds_triton.page_upper_bounds_triton(query, page_min, page_max, n, scale)
    if use_kernel:
        raise ValueError(f"page_upper_bounds: the Triton kernel cannot run: {reason}")
    return page_upper_bounds_torch(query, page_min[:, :, :n], page_max[:, :, :n]) * scale
