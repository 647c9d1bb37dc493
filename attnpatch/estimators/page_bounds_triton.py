"""Fused Triton kernel for Quest's page bounds (`attnpatch.estimators.page_bounds`): for every page
and query head, `σ · Σ_d max(q_d·min_d, q_d·max_d)` = `σ · (relu(q)·max + min(q, 0)·min)`.

One program per (batch · KV head, block of `BLOCK_N` pages) loads the G query rows of the KV head once
(zero-padded to 16 rows for `tl.dot`), reads each page's min and max rows once, in their own dtype,
and multiplies in `tl.dot` with float32 accumulation (IEEE for float32 tables, so CPU tests and fp32
models are exact to float rounding); the output is float32 `[B, Hkv, G, n]`. The torch alternative was
two batched GEMMs of M = G rows: on the H200 (torch 2.11, bf16 tables) they dispatched to a MAGMA
kernel at 155 µs a call, 9.3 ms of a 21.2 ms decode step at 128K, batch 4, 32 layers
(bench/results/hf_decode_h200/); reading both tables once takes ≈ 30 µs at the memory bandwidth.

`page_bounds_op` wraps it as a torch custom op for compiled decode steps.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

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


@dataclass(frozen=True)
class BoundsLaunch:
    """How the page bounds are launched: `kind` "dot" (the G query rows, zero-padded to 16, times the
    page tables in `tl.dot`) or "fma" (each query row's bound as a float32 multiply-and-sum over the
    head dim, no shared memory); `block_n` pages per loop step, `iters` steps per program (a
    software-pipelined loop of `stages` stages; "fma" only)."""

    kind: str = "dot"
    block_n: int = BLOCK_N
    warps: int = NUM_WARPS
    iters: int = 1
    stages: int = 1

    def text(self) -> str:
        """The form `ATTNPATCH_BOUNDS_CONFIG` reads."""
        if self.kind == "dot":
            return f"{self.block_n},{self.warps}"
        return f"fma,{self.block_n},{self.warps},{self.iters},{self.stages}"


def launch_config() -> BoundsLaunch:
    """The launch; `ATTNPATCH_BOUNDS_CONFIG` overrides the default: `"block_n,warps"` (the dot kernel)
    or `"fma,block_n,warps,iters,stages"` (launch sweeps: bench/scripts/decode_layer.py --kernel-sweep)."""
    value = os.environ.get("ATTNPATCH_BOUNDS_CONFIG")
    if not value:
        return BoundsLaunch()
    fields = value.split(",")
    kind = "fma" if fields[0] == "fma" else "dot"
    numbers = fields[1:] if kind == "fma" else fields
    try:
        ints = [int(x) for x in numbers]
        if len(ints) != (4 if kind == "fma" else 2):
            raise ValueError
    except ValueError as e:
        raise ValueError("ATTNPATCH_BOUNDS_CONFIG must read 'block_n,warps' (e.g. '64,4') or "
                         f"'fma,block_n,warps,iters,stages' (e.g. 'fma,32,4,2,2'), got {value!r}") from e
    launch = BoundsLaunch(kind, *ints)
    if launch.block_n < 16 or launch.block_n & (launch.block_n - 1):
        raise ValueError(f"ATTNPATCH_BOUNDS_CONFIG: block_n must be a power of two >= 16, got {launch.block_n}")
    if min(launch.warps, launch.iters, launch.stages) < 1:
        raise ValueError(f"ATTNPATCH_BOUNDS_CONFIG: warps, iters and stages must be >= 1, got {value!r}")
    return launch


if triton_available():
    import triton
    import triton.language as tl

    from attnpatch.backends.triton.combine import SUM_COMBINE as _SUM

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
        hi = tl.load(MAX + b.to(tl.int64) * stride_ub + hk.to(tl.int64) * stride_uh + rows * stride_un + offs_d[None, :],
                     mask=tile_ok, other=0.0)
        lo = tl.load(MIN + b.to(tl.int64) * stride_lb + hk.to(tl.int64) * stride_lh + rows * stride_ln + offs_d[None, :],
                     mask=tile_ok, other=0.0)
        pos = tl.where(q > 0, q, 0.0).to(hi.dtype)
        neg = tl.where(q < 0, q, 0.0).to(lo.dtype)
        acc = tl.dot(pos, tl.trans(hi), input_precision=DOT_PRECISION)
        acc += tl.dot(neg, tl.trans(lo), input_precision=DOT_PRECISION)
        out = OUT + ((pid.to(tl.int64) * group + offs_g.to(tl.int64))[:, None]) * n_pages + offs_n[None, :]
        tl.store(out, acc * scale, mask=g_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _page_bounds_fma_kernel(
        Q, MIN, MAX, OUT, hkv, n_pages, stride_qb, stride_qh,
        stride_lb, stride_lh, stride_ln, stride_ub, stride_uh, stride_un, scale,
        GROUP: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
        ITERS: tl.constexpr, STAGES: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        b = pid // hkv
        hk = pid % hkv
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_D
        q_row = Q + b.to(tl.int64) * stride_qb + (hk * GROUP).to(tl.int64) * stride_qh + offs_d
        lo_base = MIN + b.to(tl.int64) * stride_lb + hk.to(tl.int64) * stride_lh + offs_d[None, :]
        hi_base = MAX + b.to(tl.int64) * stride_ub + hk.to(tl.int64) * stride_uh + offs_d[None, :]
        out_base = OUT + pid.to(tl.int64) * GROUP * n_pages
        for it in tl.range(0, ITERS, num_stages=STAGES):
            offs_n = (tl.program_id(1) * ITERS + it) * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = offs_n < n_pages
            rows = offs_n.to(tl.int64)[:, None]
            tile_ok = n_ok[:, None] & d_ok[None, :]
            hi = tl.load(hi_base + rows * stride_un, mask=tile_ok, other=0.0).to(tl.float32)
            lo = tl.load(lo_base + rows * stride_ln, mask=tile_ok, other=0.0).to(tl.float32)
            for g in tl.static_range(GROUP):
                q = tl.load(q_row + g * stride_qh, mask=d_ok, other=0.0).to(tl.float32)[None, :]
                bound = tl.reduce(tl.where(q > 0, q * hi, q * lo), 1, _SUM)
                tl.store(out_base + g * n_pages + offs_n, bound * scale, mask=n_ok)

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
    launch = launch_config()
    if launch.kind == "fma":
        per_program = launch.block_n * launch.iters
        q = query if query.stride(-1) == 1 else query.contiguous()
        _page_bounds_fma_kernel[(b * hkv, triton.cdiv(n, per_program))](
            q, page_min, page_max, out, hkv, n, q.stride(0), q.stride(1),
            page_min.stride(0), page_min.stride(1), page_min.stride(2),
            page_max.stride(0), page_max.stride(1), page_max.stride(2), float(scale),
            GROUP=group, HEAD_D=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_N=launch.block_n,
            ITERS=launch.iters, STAGES=launch.stages, num_warps=launch.warps,
        )  # fmt: skip
        return out
    q = query.to(page_min.dtype)
    if q.stride(-1) != 1:
        q = q.contiguous()
    precision = "ieee" if page_min.dtype == torch.float32 else "tf32"
    _page_bounds_kernel[(b * hkv, triton.cdiv(n, launch.block_n))](
        q, page_min, page_max, out, hkv, group, n, q.stride(0), q.stride(1),
        page_min.stride(0), page_min.stride(1), page_min.stride(2),
        page_max.stride(0), page_max.stride(1), page_max.stride(2), float(scale),
        HEAD_D=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_N=launch.block_n, DOT_PRECISION=precision, num_warps=launch.warps,
    )  # fmt: skip
    return out
