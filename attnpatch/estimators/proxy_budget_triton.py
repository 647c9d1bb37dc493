"""Fused Triton kernel for the second half of ProxyAttn's estimate (`attnpatch.estimators.proxy`): from the
block statistics of `proxy_triton`'s kernel straight to each query head's block scores `k_{h,r} − rank`,
the same values as `coverage_budget` and `rank_blocks` of the torch path.

Why: on the H200 at 128K tokens (llama3-8b layer) the torch ops after the statistics kernel — pooling the
proxy rows, copying the heads' rows out, two sorts, a cumulative sum and the masks, all over `[B, H, R, C]`
float32 tensors — took ≈ 10 of the estimate's 21 ms, and at 32K they are a few dozen launches per layer
(bench/results/methods_h200_v4/profile_select/).

One program per (query block, batch, KV head), reading that query block's rows of the statistics:

* the proxy row: the max over the block's `sample` proxy rows of each key block's value, `-inf` where the
  key block is not allowed; its rank among the row's blocks (descending, ties to the lower column, blocks
  not allowed last), from one sort of `(score, column)` packed into an int64;
* per query head of the KV group: its head row's masses, sorted descending; the budget is the number of
  blocks whose exclusive prefix sum is below `γ_h` × the row's total, clamped to `[lo_h, hi_h]` (`lo` wins)
  and rounded up — `coverage_budget`'s definition;
* stores `budget − rank` for every key block of every head of the group.

The sort is a bitonic network written here over a power-of-two row held in registers (each
compare-exchange a reshape of the row into pairs); statistics outside the allowed blocks are not read
(the torch path's masses there are 0). The prefix sum runs in the
kernel's order rather than `torch.cumsum`'s: a budget can differ by one block where a prefix lands on
`γ` × total within float rounding. Rows wider than `MAX_COLS` key blocks are declined (the torch path runs).
"""

from __future__ import annotations

import torch

from attnpatch.backends.triton.utils import (
    is_interpreted,
    on_input_device,
    tensor_device_ok,
    triton_available,
)

__all__ = ["MAX_COLS", "budget_scores_triton", "unsupported_reason"]

MAX_COLS = 1 << 13  # key blocks per row held in registers (1M tokens at 128-token blocks)


if triton_available():
    import triton
    import triton.language as tl

    from attnpatch.backends.triton.combine import SUM_COMBINE as _SUM

    @triton.jit
    def _sorted_descending(x, LOG2: tl.constexpr):
        """`x` (`[2^LOG2]`) sorted descending by a bitonic network: stage `s` merges runs of `2^(s+1)`
        entries, each step compares the pairs `2^i` apart (a reshape to `[A, 2, 2^i]`)."""
        for s in tl.static_range(LOG2):
            for t in tl.static_range(s + 1):
                pairs = tl.reshape(x, ((1 << LOG2) >> (s - t + 1), 2, 1 << (s - t)))
                side = tl.arange(0, 2)[None, :, None]
                first = tl.reduce(tl.where(side == 0, pairs, 0), 1, _SUM)
                second = tl.reduce(tl.where(side == 1, pairs, 0), 1, _SUM)
                big = tl.maximum(first, second)
                small = tl.minimum(first, second)
                # runs of 2^(s+1) alternate descending / ascending; the last stage is one descending run
                rising = ((tl.arange(0, (1 << LOG2) >> (s - t + 1)) >> t) & 1)[:, None] == 1
                lead = tl.where(rising, small, big)
                tail = tl.where(rising, big, small)
                x = tl.reshape(tl.where(side == 0, lead[:, None, :], tail[:, None, :]), (1 << LOG2,))
        return x

    @triton.jit
    def _budget_scores_kernel(
        VAL, ALLOWED, GAMMA, LO, HI, OUT, hkv, group, n_rows, n_cols, sample, per_block, first_block,
        stride_ab, stride_ar, stride_ob, stride_oh, stride_or,
        LOG2_C: tl.constexpr,
    ):  # fmt: skip
        r = tl.program_id(0)  # query block within the chunk
        bh = tl.program_id(1)
        b = bh // hkv
        g = bh % hkv
        cols = tl.arange(0, 1 << LOG2_C)  # a column when loading, a rank position when storing
        col_ok = cols < n_cols
        block = first_block + r
        ok = col_ok & (tl.load(ALLOWED + b * stride_ab + block * stride_ar + cols, mask=col_ok, other=0) != 0)
        stats = VAL + bh.to(tl.int64) * n_cols * n_rows + cols.to(tl.int64) * n_rows + r * per_block
        proxy = tl.full([1 << LOG2_C], float("-inf"), dtype=tl.float32)
        for i in range(0, sample):
            proxy = tl.maximum(proxy, tl.load(stats + i, mask=ok, other=float("-inf")))
        # rank by (score, column): the score's bits as an order-preserving int32 above the reversed column
        bits = proxy.to(tl.int32, bitcast=True)
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
        key = tl.where(col_ok, key, -2147483648)  # padding lanes sort after every block
        packed = (key.to(tl.int64) << 32) | tl.where(col_ok, n_cols - 1 - cols, 0).to(tl.int64)
        order = _sorted_descending(packed, LOG2_C)
        col_at = (n_cols - 1) - (order & 0xFFFFFFFF).to(tl.int32)  # the column at each rank (padding last)
        out_row = OUT + b.to(tl.int64) * stride_ob + block.to(tl.int64) * stride_or + col_at
        for j in range(0, group):
            h = g * group + j
            mass = tl.load(stats + sample + j, mask=ok, other=0.0)
            ordered = _sorted_descending(mass, LOG2_C)
            total = tl.reduce(mass, 0, _SUM)
            before = tl.associative_scan(ordered, 0, _SUM) - ordered
            need = tl.reduce((before < tl.load(GAMMA + h) * total).to(tl.float32), 0, _SUM)
            budget = tl.maximum(tl.minimum(need, tl.load(HI + h)), tl.load(LO + h))
            budget = tl.math.ceil(budget)
            tl.store(out_row + h.to(tl.int64) * stride_oh, budget - cols.to(tl.float32), mask=col_ok)

    _KERNEL_INTERPRETED = is_interpreted(_budget_scores_kernel)
else:
    _KERNEL_INTERPRETED = False


def unsupported_reason(n_cols: int, like: torch.Tensor) -> str | None:
    """Why the kernel cannot take rows of `n_cols` key blocks of statistics on `like`'s device (None when
    it can)."""
    if not triton_available():
        return "triton is not installed"
    if not tensor_device_ok(like, _KERNEL_INTERPRETED):
        return f"device {like.device} (need CUDA, or CPU with TRITON_INTERPRET=1 set before import)"
    if not 1 <= n_cols <= MAX_COLS:
        return f"{n_cols} key blocks per row (1..{MAX_COLS})"
    return None


@on_input_device
def budget_scores_triton(val: torch.Tensor, allowed: torch.Tensor, gamma: torch.Tensor, lo: torch.Tensor,
                         hi: torch.Tensor, out: torch.Tensor, first_block: int, sample: int) -> None:
    """Write `out[:, :, first_block : first_block + nr]` (`[B, Hq, R, C]` float32) from one chunk's statistics
    `val` `[B, Hkv, C, nr · (sample + G)]` (`proxy_triton`'s layout: per query block its `sample` proxy rows,
    then the last row of each of the group's G heads), `allowed` `[B, 1, R, C]` bool and the per-head
    `gamma`, `lo`, `hi` (`[Hq]` float32)."""
    b, hkv, cc, n = val.shape
    hq = out.shape[1]
    group = hq // hkv
    per_block = sample + group
    nr = n // per_block
    reason = unsupported_reason(cc, val)
    if reason is not None:
        raise ValueError(f"budget_scores_triton: {reason}")
    if n != nr * per_block or out.shape[0] != b or out.shape[3] != cc or allowed.shape[-1] != cc:
        raise ValueError(f"budget_scores_triton: statistics {tuple(val.shape)}, scores {tuple(out.shape)} and "
                         f"allowed {tuple(allowed.shape)} do not match (sample {sample})")
    if nr == 0:
        return
    allowed8 = allowed.view(torch.uint8) if allowed.dtype == torch.bool else allowed
    if allowed8.stride(-1) != 1:
        allowed8 = allowed8.contiguous()
    params = [p.to(device=val.device, dtype=torch.float32).contiguous() for p in (gamma, lo, hi)]
    log2_c = max(4, (cc - 1).bit_length())
    _budget_scores_kernel[(nr, b * hkv)](
        val, allowed8, *params, out, hkv, group, n, cc, sample, per_block, first_block,
        allowed8.stride(0), allowed8.stride(2), out.stride(0), out.stride(1), out.stride(2),
        LOG2_C=log2_c, num_warps=4 if log2_c <= 10 else 8,
    )  # fmt: skip
