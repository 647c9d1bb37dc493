"""Fused Triton kernel for XAttention's antidiagonal block scores (`attnpatch.estimators.antidiagonal`):
the same `[B, Hq, R, C]` float32 output as the torch path, without writing the group scores to memory.

Why: the torch path materialises the float32 `[query groups × key groups]` scores chunk by chunk and
runs the mask and softmax passes over them; on the H200 at 128K tokens that estimate is 54 % of the
`xattention` attention layer's time (bench/results/README.md, "Sparse-prefill methods", the
"estimate share at 128K" column), mostly the memory traffic of those scores. Measured on the H200
(llama3-8b layer, stride 8, block 128, bf16; bench/results/methods_h200_v3/): 3.14 ms vs 6.62 at 32K,
55.9 vs 88.6 at 128K. It does twice the dot FLOPs of one pass (1/8 of causal attention's at stride 8:
≈ 320 TFLOP/s at 128K), so at 0.31 density the estimate stays ≈ 40 % of the method's time.

One program per (batch · query head, tile of `BLOCK_G` query groups), heaviest (last) tiles first. The
score of (query group g, key group g') is `Σ_t q[gS + S-1-t] · k[g'S + t]` (S = stride): the kernel
runs it as S `tl.dot`s of `[BLOCK_G, D] × [D, BLOCK_KG]` (row `S-1-t` of every query group against
row `t` of every key group, loaded in place through strides, float32 accumulation; the same sum as the
torch path's single GEMM on the reshaped `[·, S·D]` layouts, never building them), times
`scale / S` (and log2 e, for exp2). Pass 1 over the visible key tiles keeps the online row max and row
sum of exp; pass 2 recomputes the tile, `p = exp(s - m) / l`, sums `p` into the `block × block` pairs
(`tl.reshape` to `[rows, per, cols, per]` + two sums, per = block / S groups) and stores them: each
output block belongs to exactly one (query tile, key tile), so no atomics; blocks never visited keep
the zeros of the output buffer. GQA: query head h reads KV head `h // (Hq / Hkv)`; K is never repeated.

Visibility, as the torch path: a key group is visible when its first key is at or before the query
group's last query (`off = Lk - Lq`, chunked prefill), within the sliding window rule when
`bounds.window` is set, and holds a real key; a query group scores only when it holds a real query
(before Lq). Padding comes from `real_keys` as one int8 `[B, Lk]` row per sequence: padding keys are
zeroed at load time (as the torch path zeroes them before its GEMM) and the per-group "holds a real
key / query" flags are OR-ed from it inside the kernel. Key tiles past the tile's causal limit (and
before its window) are never visited: about half the work. Rows with nothing visible give zeros.

Choices: tiles of 128 query groups × 128 key groups, 8 warps, 3 stages where a row of Q is at most
256 bytes (D ≤ 128 in 16 bits: the best of 16 configurations at 128K within 2 %, the best at 32K —
bench/scripts/tune_antidiagonal.py), else 64 × 64 with 4 warps (untuned); tiles at least `per` wide,
so a tile holds whole blocks; the S-long reduction as a loop (so S·D up to 16·256 costs no registers
or shared memory beyond one Q slice and one K slice); fp32 inputs use IEEE dots. Declined (the torch path
runs): other devices or dtypes, Q and K of different dtypes, strides / blocks that are not powers of
two (or blocks not a multiple of the stride), head dims above 256, Hq not a multiple of Hkv.
"""

from __future__ import annotations

import os

import torch

from attnpatch.backends.triton.utils import (
    is_interpreted,
    is_pow2,
    on_input_device,
    scorer_input_reason,
    triton_available,
    with_contiguous_last_dim,
)
from attnpatch.estimators.keys import real_keys
from attnpatch.sparsity import KeyBounds, num_blocks

__all__ = ["antidiagonal_block_scores_triton", "unsupported_reason"]

_LOG2E = 1.4426950408889634


def launch_config(head_dim: int, elem_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """`((query groups, key groups) per tile, (num_warps, num_stages))`. Tuned on the H200 for rows of
    at most 256 bytes (one stage: a `[128, D]` Q slice + a `[D, 128]` K slice, 64 KiB at D = 128 in
    bf16); wider rows keep 64 × 64 tiles (one stage is 128 KiB at D = 256 in float32: one stage there).
    Benchmarks may set `ATTNPATCH_ANTIDIAGONAL_CONFIG="GxK,warps,stages"` to try another configuration
    through the whole method (bench/scripts/tune_antidiagonal.py finds one)."""
    forced = _forced_config()
    if forced is not None:
        return forced
    row = head_dim * elem_size
    if row <= 256:
        return (128, 128), (8, 3)
    return (64, 64), (4, 1 if row > 512 else 2)


def _forced_config() -> tuple[tuple[int, int], tuple[int, int]] | None:
    """`((tile_g, tile_kg), (warps, stages))` from `ATTNPATCH_ANTIDIAGONAL_CONFIG`, or None."""
    value = os.environ.get("ATTNPATCH_ANTIDIAGONAL_CONFIG")
    if not value:
        return None
    try:
        tiles, warps, stages = value.split(",")
        tg, tk = (int(x) for x in tiles.split("x"))
        return (tg, tk), (int(warps), int(stages))
    except ValueError as e:
        raise ValueError(f"ATTNPATCH_ANTIDIAGONAL_CONFIG must read 'GxK,warps,stages' (e.g. '128x64,8,2'), "
                         f"got {value!r}") from e



if triton_available():
    import triton
    import triton.language as tl

    from attnpatch.backends.triton.combine import MAX_COMBINE as _MAX
    from attnpatch.backends.triton.combine import SUM_COMBINE as _SUM

    # `tl.full` replaces `tl.zeros` for the same reason as `combine.py`'s reductions (interpretable when
    # triton was imported before TRITON_INTERPRET was set).

    @triton.jit
    def _group_scores(
        q_base, k_base, real_base, qstart, q_ok, last_q, first_q, kg0, lq, lk, window,
        stride_ql, stride_kl, qk_scale,
        STRIDE: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr,
        BLOCK_KG: tl.constexpr, HAS_PAD: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):  # fmt: skip
        """`[BLOCK_G, BLOCK_KG]` scores (log2 units) of the key tile from `kg0`, -inf where not visible."""
        offs_kg = kg0 + tl.arange(0, BLOCK_KG)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_D
        acc = tl.full([BLOCK_G, BLOCK_KG], 0.0, dtype=tl.float32)
        kreal = tl.full([BLOCK_KG], 0, dtype=tl.int32)
        for t in range(STRIDE):
            qrows = qstart + (STRIDE - 1 - t)  # query groups reversed: row S-1-t meets key row t
            q = tl.load(q_base + qrows.to(tl.int64)[:, None] * stride_ql + offs_d[None, :],
                        mask=(qrows < lq)[:, None] & d_ok[None, :], other=0.0)
            krows = offs_kg * STRIDE + t
            k_ok = krows < lk
            if HAS_PAD:
                r = tl.load(real_base + krows, mask=k_ok, other=0).to(tl.int32)
                kreal += r
                k_ok = k_ok & (r != 0)  # padding keys read as zeros
            k = tl.load(k_base + krows.to(tl.int64)[None, :] * stride_kl + offs_d[:, None],
                        mask=k_ok[None, :] & d_ok[:, None], other=0.0)
            acc = tl.dot(q, k, acc, input_precision=DOT_PRECISION)
        kfirst = offs_kg * STRIDE
        vis = (kfirst[None, :] <= last_q[:, None]) & q_ok[:, None]
        if HAS_WINDOW:
            vis = vis & ((kfirst + STRIDE - 1)[None, :] > (first_q - window)[:, None])
        if HAS_PAD:
            vis = vis & (kreal > 0)[None, :]
        return tl.where(vis, acc * qk_scale, float("-inf"))

    @triton.jit
    def _antidiagonal_kernel(
        Q, K, REAL, OUT, hq, group, lq, lk, off, n_rows, n_cols, window,
        stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl, qk_scale,
        STRIDE: tl.constexpr, PER: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_G: tl.constexpr, BLOCK_KG: tl.constexpr, HAS_PAD: tl.constexpr, HAS_WINDOW: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):  # fmt: skip
        tile = tl.num_programs(0) - 1 - tl.program_id(0)  # the last tiles see the most keys: start them first
        bh = tl.program_id(1)
        b = bh // hq
        h = bh % hq
        g0 = tile * BLOCK_G
        q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        k_base = K + b.to(tl.int64) * stride_kb + (h // group).to(tl.int64) * stride_kh
        real_base = REAL + b.to(tl.int64) * lk
        offs_g = g0 + tl.arange(0, BLOCK_G)
        qstart = offs_g * STRIDE  # first query of each group (index in this call)
        q_ok = qstart < lq
        if HAS_PAD:  # a query is real when its own key position is
            qreal = tl.full([BLOCK_G], 0, dtype=tl.int32)
            for t in range(STRIDE):
                rows = qstart + t
                qreal += tl.load(real_base + off + rows, mask=rows < lq, other=0).to(tl.int32)
            q_ok = q_ok & (qreal > 0)
        last_q = off + tl.minimum(qstart + STRIDE, lq) - 1
        first_q = off + qstart
        # Key tiles this query tile may see: up to its last query; from its window's start.
        kg_end = (off + tl.minimum(g0 * STRIDE + BLOCK_G * STRIDE, lq) - 1) // STRIDE + 1
        kg_start = 0
        if HAS_WINDOW:
            kg_start = (tl.maximum(off + g0 * STRIDE - window + 1, 0) // STRIDE) // BLOCK_KG * BLOCK_KG

        m = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        acc_l = tl.full([BLOCK_G], 0.0, dtype=tl.float32)
        for kg0 in range(kg_start, kg_end, BLOCK_KG):
            s = _group_scores(q_base, k_base, real_base, qstart, q_ok, last_q, first_q, kg0, lq, lk, window,
                              stride_ql, stride_kl, qk_scale, STRIDE, HEAD_D, BLOCK_D, BLOCK_G, BLOCK_KG,
                              HAS_PAD, HAS_WINDOW, DOT_PRECISION)
            m_new = tl.maximum(m, tl.reduce(s, 1, _MAX))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            acc_l = acc_l * tl.exp2(m - m_use) + tl.reduce(tl.exp2(s - m_use[:, None]), 1, _SUM)
            m = m_new

        m_use = tl.where(m == float("-inf"), 0.0, m)
        inv_l = tl.where(acc_l > 0, 1.0 / tl.where(acc_l > 0, acc_l, 1.0), 0.0)
        rb = g0 // PER + tl.arange(0, BLOCK_G // PER)
        out_base = OUT + bh.to(tl.int64) * n_rows * n_cols
        for kg0 in range(kg_start, kg_end, BLOCK_KG):
            s = _group_scores(q_base, k_base, real_base, qstart, q_ok, last_q, first_q, kg0, lq, lk, window,
                              stride_ql, stride_kl, qk_scale, STRIDE, HEAD_D, BLOCK_D, BLOCK_G, BLOCK_KG,
                              HAS_PAD, HAS_WINDOW, DOT_PRECISION)
            p = tl.exp2(s - m_use[:, None]) * inv_l[:, None]  # exp2(-inf) = 0 where not visible
            blk = tl.reduce(tl.reduce(tl.reshape(p, [BLOCK_G // PER, PER, BLOCK_KG // PER, PER]), 3, _SUM), 1, _SUM)
            cb = kg0 // PER + tl.arange(0, BLOCK_KG // PER)
            tl.store(out_base + rb[:, None] * n_cols + cb[None, :], blk,
                     mask=(rb < n_rows)[:, None] & (cb < n_cols)[None, :])

    _KERNEL_INTERPRETED = is_interpreted(_antidiagonal_kernel)
else:
    _KERNEL_INTERPRETED = False


def unsupported_reason(query: torch.Tensor, key: torch.Tensor, block: int, stride: int) -> str | None:
    """Why the kernel cannot score these inputs (None when it can): the caller runs the torch path."""
    reason = scorer_input_reason(query, key, _KERNEL_INTERPRETED)
    if reason is None and (not is_pow2(stride) or not is_pow2(block) or block % stride):
        reason = f"stride {stride} and block {block} must be powers of two, the block a multiple of the stride"
    return reason


@on_input_device
def antidiagonal_block_scores_triton(query: torch.Tensor, key: torch.Tensor, scale: float, bounds: KeyBounds,
                                     block: int, stride: int, *, tiles: tuple[int, int] | None = None,
                                     launch: tuple[int, int] | None = None) -> torch.Tensor:
    """`[B, Hq, R, C]` float32, as `antidiagonal_block_scores_torch` (query `[B, Hq, Lq, D]`, key
    `[B, Hkv, Lk, D]`). `tiles`: (query groups, key groups) per tile, powers of two >= 16 (tests; the
    default from `launch_config`), raised to `block // stride` when smaller; `launch`: (num_warps,
    num_stages), default from `launch_config` (tuning). Raises ValueError on
    inputs the kernel declines (`unsupported_reason`)."""
    reason = unsupported_reason(query, key, block, stride)
    if reason is not None:
        raise ValueError(f"antidiagonal_block_scores_triton: {reason}")
    b, hq, lq, d = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    rows, cols = num_blocks(lq, block), num_blocks(lk, block)
    out = torch.zeros(b, hq, rows, cols, dtype=torch.float32, device=query.device)
    if out.numel() == 0:
        return out
    per = block // stride
    default_tiles, default_launch = launch_config(d, query.element_size())
    tile_g, tile_kg = tiles or default_tiles
    tile_g, tile_kg = max(tile_g, per), max(tile_kg, per)
    real = real_keys(bounds, b, lk, query.device)
    real8 = (torch.ones(1, dtype=torch.int8, device=query.device) if real is None
             else real.to(torch.int8).contiguous())
    q, k = with_contiguous_last_dim(query), with_contiguous_last_dim(key)
    warps, stages = launch or default_launch
    grid = (triton.cdiv(rows * per, tile_g), b * hq)
    _antidiagonal_kernel[grid](
        q, k, real8, out, hq, hq // hkv, lq, lk, lk - lq, rows, cols,
        0 if bounds.window is None else int(bounds.window),
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        float(scale) / stride * _LOG2E,
        STRIDE=stride, PER=per, HEAD_D=d, BLOCK_D=max(16, triton.next_power_of_2(d)),
        BLOCK_G=tile_g, BLOCK_KG=tile_kg, HAS_PAD=real is not None, HAS_WINDOW=bounds.window is not None,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32", num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out
