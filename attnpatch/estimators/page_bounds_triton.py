"""Fused Triton kernel for Quest's page bounds (`attnpatch.estimators.page_bounds`): for every page
and query head, `σ · Σ_d max(q_d·min_d, q_d·max_d)` = `σ · (relu(q)·max + min(q, 0)·min)`.

One program per (batch · KV head, block of `BLOCK_N` pages) loads the G query rows of the KV head once
(zero-padded to 16 rows for `tl.dot`), reads each page's min and max rows once, in their own dtype,
and multiplies in `tl.dot` with float32 accumulation (IEEE for float32 tables, so CPU tests and fp32
models are exact to float rounding); the output is float32 `[B, Hkv, G, n]`. The torch alternative was
two batched GEMMs of M = G rows: on the H200 (torch 2.11, bf16 tables) they dispatched to a MAGMA
kernel at 155 µs a call, 9.3 ms of a 21.2 ms decode step at 128K, batch 4, 32 layers
(bench/results/hf_decode_h200/); reading both tables once takes ≈ 30 µs at the memory bandwidth.
At 128K, batch 4 the kernel reads the two 16.8 MB tables at 2.16 TB/s on an H100 (15.5 µs a call inside a
graph of 8 calls, 64 % of its bandwidth) for every pages-per-program × warps launch tried. Measured and
ruled out (twelfth session, bench/results/decode_layer/select_variants_h100_2026-12-05/): a
multiply-and-sum variant without `tl.dot` or shared memory, one to eight software-pipelined page blocks
per program — 17.2 µs at best (13 launches), 6.8 vs 7.7 µs at batch 1.

`page_bounds_op` wraps it as a torch custom op for compiled decode steps.
"""

from __future__ import annotations

import os

import torch

from attnpatch.backends.triton.utils import (
    is_interpreted,
    on_input_device,
    tensor_device_ok,
    triton_available,
)

__all__ = ["page_upper_bounds_triton", "unsupported_reason"]

BLOCK_N = 64  # pages per program
NUM_WARPS = 4


def launch_config() -> tuple[int, int]:
    """`(pages per program, num_warps)`; `ATTNPATCH_BOUNDS_CONFIG="block_n,warps"` overrides the
    default (launch sweeps: bench/scripts/decode_layer.py --kernel-sweep)."""
    value = os.environ.get("ATTNPATCH_BOUNDS_CONFIG")
    if not value:
        return BLOCK_N, NUM_WARPS
    try:
        block_n, warps = (int(x) for x in value.split(","))
    except ValueError as e:
        raise ValueError(f"ATTNPATCH_BOUNDS_CONFIG must read 'block_n,warps' (e.g. '64,4'), got {value!r}") from e
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"ATTNPATCH_BOUNDS_CONFIG: block_n must be a power of two >= 16, got {block_n}")
    return block_n, warps


if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _page_bounds_kernel(
        Q, MIN, MAX, OUT, hkv, group, n_pages, stride_qb, stride_qh,
        stride_lb, stride_lh, stride_ln, stride_ub, stride_uh, stride_un, scale,
        HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        blk = tl.program_id(1)
        b = pid // hkv
        hk = pid % hkv
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        d_ok = offs_d < HEAD_D
        g_ok = offs_g < group
        n_ok = offs_n < n_pages
        heads = (hk * group + offs_g).to(tl.int64)
        q = tl.load(Q + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0)
        rows = offs_n.to(tl.int64)[:, None]
        tile_ok = n_ok[:, None] & d_ok[None, :]
        hi = tl.load(MAX + b.to(tl.int64) * stride_ub + hk.to(tl.int64) * stride_uh + rows * stride_un
                     + offs_d[None, :], mask=tile_ok, other=0.0)
        lo = tl.load(MIN + b.to(tl.int64) * stride_lb + hk.to(tl.int64) * stride_lh + rows * stride_ln
                     + offs_d[None, :], mask=tile_ok, other=0.0)
        pos = tl.where(q > 0, q, 0.0).to(hi.dtype)
        neg = tl.where(q < 0, q, 0.0).to(lo.dtype)
        acc = tl.dot(pos, tl.trans(hi), input_precision=DOT_PRECISION)
        acc += tl.dot(neg, tl.trans(lo), input_precision=DOT_PRECISION)
        out = OUT + ((pid.to(tl.int64) * group + offs_g.to(tl.int64))[:, None]) * n_pages + offs_n[None, :]
        tl.store(out, acc * scale, mask=g_ok[:, None] & n_ok[None, :])

    _KERNEL_INTERPRETED = is_interpreted(_page_bounds_kernel)
else:
    _KERNEL_INTERPRETED = False


def unsupported_reason(query: torch.Tensor, page_min: torch.Tensor, page_max: torch.Tensor) -> str | None:
    """Why the kernel cannot take these inputs (None when it can): the caller runs the torch path."""
    if not triton_available():
        return "triton is not installed"
    if not tensor_device_ok(query, _KERNEL_INTERPRETED) or {page_min.device, page_max.device} != {query.device}:
        return f"device {query.device} (need CUDA, or CPU with TRITON_INTERPRET=1 set before import)"
    if page_min.dtype != page_max.dtype or page_min.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"page tables of dtype {page_min.dtype} / {page_max.dtype}; allowed: one of float16, bfloat16, float32"
    if query.shape[2] != 1:
        return f"{query.shape[2]} query positions (a decode step has 1)"
    if query.shape[1] % page_min.shape[1]:
        return f"{query.shape[1]} query heads are not a multiple of {page_min.shape[1]} KV heads"
    if query.shape[-1] > 256:
        return f"head dim {query.shape[-1]} above 256"
    if page_min.stride(-1) != 1 or page_max.stride(-1) != 1:
        return "page tables without unit stride along the head dim"
    return None


@on_input_device
def page_upper_bounds_triton(query: torch.Tensor, page_min: torch.Tensor, page_max: torch.Tensor, n: int,
                             scale: float) -> torch.Tensor:
    """`[B, Hkv, G, n]` float32 scaled bounds of the first `n` pages (query `[B, Hq, 1, D]`, tables
    `[B, Hkv, >= n, D]`). Raises ValueError on inputs the kernel declines (`unsupported_reason`)."""
    reason = unsupported_reason(query, page_min, page_max)
    if reason is not None:
        raise ValueError(f"page_upper_bounds_triton: {reason}")
    b, hq, _, d = query.shape
    hkv = page_min.shape[1]
    group = hq // hkv
    out = torch.empty(b, hkv, group, n, dtype=torch.float32, device=query.device)
    if out.numel() == 0:
        return out
    q = query.to(page_min.dtype)
    if q.stride(-1) != 1:
        q = q.contiguous()
    precision = "ieee" if page_min.dtype == torch.float32 else "tf32"
    block_n, warps = launch_config()
    _page_bounds_kernel[(b * hkv, triton.cdiv(n, block_n))](
        q, page_min, page_max, out, hkv, group, n, q.stride(0), q.stride(1),
        page_min.stride(0), page_min.stride(1), page_min.stride(2),
        page_max.stride(0), page_max.stride(1), page_max.stride(2), float(scale),
        HEAD_D=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_N=block_n, DOT_PRECISION=precision, num_warps=warps,
    )  # fmt: skip
    return out
