"""Fused Triton kernel for ProxyAttn's block statistics (`attnpatch.estimators.proxy`): the same
`(proxy [B, Hkv, R, C], mass [B, Hq, R, C])` as the torch path, without writing row × key scores.

Why: the torch path materialises, per chunk of query blocks, the float32 scores of every scored row
(the `sample` proxy rows and the group's `Hq / Hkv` last rows of each query block) against every key
and runs the mask, max and exp passes over them. On the H200 at 128K tokens (llama3-8b layer) that
estimate took ≈ 140 of the method's 197 ms (bench/results/README.md, 2026-12-04 "Reworked estimates"),
while its dot products are ≈ 4 % of a dense `Q·Kᵀ`: the time was memory traffic.

What the kernel computes: for each scored row `i` (absolute position `p_i`) and key block `c`, over the
keys `j` of the block that the row may see (`j <= p_i`, a real key, inside the sliding window):
`top[i, c] = max_j σ·q_i·k_j` and `sums[i, c] = Σ_j exp(σ·q_i·k_j − top[i, c])` — the torch path's
`block_stats` — and from them the row's softmax over all its keys, block by block: the block's largest
probability `exp(top − m) / Z` for a proxy row, its probability mass (that times `sums`) for a head's row.
A program owns a tile of `BLOCK_M` rows of one (batch, KV head) and walks the key blocks its rows may
see (up to the block of its last row's position, from its first row's window start). Pass 1: one
`[BLOCK_M, D] × [D, block]` `tl.dot` per block (float32 accumulation, exp2 in log2 units), `top` and
`sums` stored, the row max `m` and denominator `Z` kept online. Pass 2 reads the tile's own `top` /
`sums` back (no dots) and writes the per-block value in place of `top`. No atomics; the outputs are laid
out `[B, Hkv, C, rows]` so the stores are contiguous; blocks a tile never visits stay 0. Pooling the
proxy rows of a query block (max) and reshaping the heads' rows stay torch ops over `[rows, C]`, `block`×
smaller than the scores.

Rows are ordered by query block (each block's `sample` proxy rows, then its heads' last rows), so a
tile's rows have close positions and see nearly the same key blocks. The proxy row is the group's mean
query (as the torch path; computed in torch and passed in as a row). GQA: rows are per KV head, K is
read once per tile and never repeated.

Choices: tiles of 128 rows, 8 warps, 2 stages where a row of Q is at most 256 bytes (D ≤ 128 in 16 bits; the best of 8
configurations at 128K on the H200), else 64 rows with 4 warps (untuned); chunks of whole query blocks keep each
output under 2^28 elements (1 GiB). Declined (the torch path runs): other devices or dtypes, Q and K of different
dtypes, head dims above 256, Hq not a multiple of Hkv, a tensor mask (no closed form), blocks that are not powers of
two.
"""

from __future__ import annotations

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
from attnpatch.estimators.proxy_budget_triton import budget_scores_triton
from attnpatch.estimators.proxy_budget_triton import unsupported_reason as budget_unsupported_reason
from attnpatch.sparsity import KeyBounds, num_blocks

__all__ = ["block_scores_unsupported_reason", "proxy_block_scores_triton", "proxy_scores_triton",
           "unsupported_reason"]

_LOG2E = 1.4426950408889634
OUT_ELEMENTS = 1 << 28  # elements of each statistic per chunk of query blocks (1 GiB in float32)


def launch_config(head_dim: int, elem_size: int) -> tuple[int, tuple[int, int]]:
    """`(rows per tile, (num_warps, num_stages))`. H200, llama3-8b layer at 128K (bench/scripts/tune_proxy.py,
    bench/results/methods_h200_v4/two_pass/tune_proxy.json; the whole `proxy_scores_triton`): 128 rows, 8 warps,
    2 stages 13.1 ms, the best of 8; 3 stages 15.4 ms; 64 rows 13.6–16.4 ms."""
    if head_dim * elem_size <= 256:
        return 128, (8, 2)
    return 64, (4, 2)


if triton_available():
    import triton
    import triton.language as tl

    from attnpatch.backends.triton.combine import MAX_COMBINE as _MAX
    from attnpatch.backends.triton.combine import SUM_COMBINE as _SUM

    @triton.jit
    def _block_stats_kernel(
        Q, K, POS, REAL, VAL, SUMS, hkv, n_rows, lk, n_cols, window, sample, per_block,
        stride_qb, stride_qh, stride_qr, stride_kb, stride_kh, stride_kl, qk_scale,
        HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_PAD: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):  # fmt: skip
        tile = tl.num_programs(0) - 1 - tl.program_id(0)  # the last rows see the most keys: start them first
        bh = tl.program_id(1)
        b = bh // hkv
        h = bh % hkv
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        pos = tl.load(POS + rows, mask=row_ok, other=-1)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_D
        q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        q = tl.load(q_base + rows.to(tl.int64)[:, None] * stride_qr + offs_d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
        real_base = REAL + b.to(tl.int64) * lk
        c_end = tl.minimum(tl.reduce(pos, 0, _MAX) // BLOCK_N + 1, n_cols)
        c_start = 0
        if HAS_WINDOW:
            low = -tl.reduce(tl.where(row_ok, -pos, -(1 << 30)), 0, _MAX)  # the tile's first row
            c_start = tl.maximum(low - window + 1, 0) // BLOCK_N
        out_base = bh.to(tl.int64) * n_cols * n_rows
        # Pass 1: per key block, the block's max score and sum of exp2 (log2 units), stored; the row's max
        # and softmax denominator over all its blocks, kept online.
        m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        z = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
        for c in range(c_start, c_end):
            kpos = c * BLOCK_N + tl.arange(0, BLOCK_N)
            k_ok = kpos < lk
            if HAS_PAD:
                k_ok = k_ok & (tl.load(real_base + kpos, mask=k_ok, other=0) != 0)
            k = tl.load(k_base + kpos.to(tl.int64)[None, :] * stride_kl + offs_d[:, None],
                        mask=k_ok[None, :] & d_ok[:, None], other=0.0)
            s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
            vis = k_ok[None, :] & (kpos[None, :] <= pos[:, None])
            if HAS_WINDOW:
                vis = vis & (pos[:, None] - kpos[None, :] < window)
            s = tl.where(vis, s, float("-inf"))
            top = tl.reduce(s, 1, _MAX)
            top_use = tl.where(top == float("-inf"), 0.0, top)
            sums = tl.reduce(tl.exp2(s - top_use[:, None]), 1, _SUM)
            m_new = tl.maximum(m, top)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            z = z * tl.exp2(m - m_use) + sums * tl.exp2(top - m_use)
            m = m_new
            at = out_base + c * n_rows + rows
            tl.store(VAL + at, top, mask=row_ok)
            tl.store(SUMS + at, sums, mask=row_ok)
        # Pass 2 over the tile's own statistics (read back): each block's largest probability
        # exp2(top − m) / z for a proxy row, its probability mass (that times its sum) for a head's row.
        m_use = tl.where(m == float("-inf"), 0.0, m)
        inv_z = tl.where(z > 0, 1.0 / tl.where(z > 0, z, 1.0), 0.0)
        is_proxy = (rows % per_block) < sample
        for c in range(c_start, c_end):
            at = out_base + c * n_rows + rows
            top = tl.load(VAL + at, mask=row_ok, other=float("-inf"))
            sums = tl.load(SUMS + at, mask=row_ok, other=0.0)
            peak = tl.exp2(top - m_use) * inv_z
            tl.store(VAL + at, tl.where(is_proxy, peak, peak * sums), mask=row_ok)

    _KERNEL_INTERPRETED = is_interpreted(_block_stats_kernel)
else:
    _KERNEL_INTERPRETED = False



def unsupported_reason(query: torch.Tensor, key: torch.Tensor, bounds: KeyBounds, block: int) -> str | None:
    """Why the kernel cannot score these inputs (None when it can): the caller runs the torch path."""
    reason = scorer_input_reason(query, key, _KERNEL_INTERPRETED)
    if reason is None and bounds.mask is not None:
        reason = "a tensor attention mask (no closed form)"
    if reason is None and (not is_pow2(block) or block < 16):
        reason = f"block {block} (need a power of two >= 16)"
    return reason


def block_scores_unsupported_reason(query: torch.Tensor, key: torch.Tensor, bounds: KeyBounds, block: int
                                    ) -> str | None:
    """Why `proxy_block_scores_triton` cannot take these inputs (None when it can)."""
    return unsupported_reason(query, key, bounds, block) or budget_unsupported_reason(
        num_blocks(key.shape[2], block), query)


def scored_rows(query: torch.Tensor, kv_heads: int, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(q [B, Hkv, R · (S + G), D], index [R · (S + G)])`: per query block `r`, the `S` proxy rows (the
    group's mean query at `rows[r]`) then the last row `rows[r, 0]` of each of the group's `G` heads;
    `index` is the query row behind each (index into the call's queries)."""
    b, hq, _, d = query.shape
    g = hq // kv_heads
    nr, s = rows.shape
    proxy = query[:, :, rows.reshape(-1)].view(b, kv_heads, g, nr, s, d).mean(2)  # [B, Hkv, R, S, D]
    last = query[:, :, rows[:, 0]].view(b, kv_heads, g, nr, d).transpose(2, 3)  # [B, Hkv, R, G, D]
    q = torch.cat([proxy, last], dim=3).reshape(b, kv_heads, nr * (s + g), d)
    index = torch.cat([rows, rows[:, :1].expand(nr, g)], dim=1).reshape(-1)
    return q, index


def _chunk_statistics(query: torch.Tensor, key: torch.Tensor, bounds: KeyBounds, scale: float, block: int,
                      rows: torch.Tensor, tile_rows: int | None, launch: tuple[int, int] | None, out_elements: int):
    """Yield `(r0, r1, val)` per chunk of query blocks `r0 .. r1`: `val` `[B, Hkv, C, (r1 − r0) · (S + G)]`
    the kernel's per-block values of the chunk's scored rows (`scored_rows` order; 0 where no tile visits)."""
    b, hq, lq, d = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    rr, cc = num_blocks(lq, block), num_blocks(lk, block)
    per_block = rows.shape[1] + hq // hkv
    device = query.device
    default_tile, default_launch = launch_config(d, query.element_size())
    tile = tile_rows or default_tile
    warps, stages = launch or default_launch
    real = real_keys(bounds, b, lk, device)
    real8 = torch.ones(1, dtype=torch.int8, device=device) if real is None else real.to(torch.int8).contiguous()
    k = with_contiguous_last_dim(key)
    step = max(1, out_elements // max(1, b * hkv * cc * per_block))
    for r0 in range(0, rr, step):
        r1 = min(rr, r0 + step)
        q, index = scored_rows(query, hkv, rows[r0:r1])
        q = with_contiguous_last_dim(q)
        n = index.numel()
        pos = (index + (lk - lq)).to(torch.int32).contiguous()
        val = torch.zeros(b, hkv, cc, n, dtype=torch.float32, device=device)  # blocks never visited: 0
        sums = torch.empty(b, hkv, cc, n, dtype=torch.float32, device=device)  # visited blocks only
        _block_stats_kernel[(triton.cdiv(n, tile), b * hkv)](
            q, k, pos, real8, val, sums, hkv, n, lk, cc, 0 if bounds.window is None else int(bounds.window),
            rows.shape[1], per_block, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            float(scale) * _LOG2E,
            HEAD_D=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_M=tile, BLOCK_N=block,
            HAS_PAD=real is not None, HAS_WINDOW=bounds.window is not None,
            DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32", num_warps=warps, num_stages=stages,
        )  # fmt: skip
        yield r0, r1, val


@on_input_device
def proxy_scores_triton(query: torch.Tensor, key: torch.Tensor, bounds: KeyBounds, scale: float, block: int,
                        rows: torch.Tensor, *, tile_rows: int | None = None, launch: tuple[int, int] | None = None,
                        out_elements: int = OUT_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """`(proxy [B, Hkv, R, C], mass [B, Hq, R, C])` float32 as `attnpatch.estimators.proxy.proxy_scores`
    computes them, for the sampled rows `rows` `[R, S]` (`sampled_rows`: each block's last row first).
    `tile_rows`: rows per program and `launch` (num_warps, num_stages) (tests, tuning; defaults from
    `launch_config`); `out_elements`: elements of one
    statistic per chunk of query blocks. Raises ValueError on inputs the kernel declines."""
    reason = unsupported_reason(query, key, bounds, block)
    if reason is not None:
        raise ValueError(f"proxy_scores_triton: {reason}")
    b, hq, lq, _ = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    rr, cc = num_blocks(lq, block), num_blocks(lk, block)
    s = rows.shape[1]
    proxy = torch.zeros(b, hkv, rr, cc, dtype=torch.float32, device=query.device)
    mass = torch.zeros(b, hq, rr, cc, dtype=torch.float32, device=query.device)
    if proxy.numel() == 0:
        return proxy, mass
    for r0, r1, val in _chunk_statistics(query, key, bounds, scale, block, rows, tile_rows, launch, out_elements):
        val = val.view(b, hkv, cc, r1 - r0, s + hq // hkv)
        proxy[:, :, r0:r1] = val[..., :s].amax(-1).transpose(-1, -2)
        mass[:, :, r0:r1] = val[..., s:].permute(0, 1, 4, 3, 2).reshape(b, hq, r1 - r0, cc)
    return proxy, mass


@on_input_device
def proxy_block_scores_triton(query: torch.Tensor, key: torch.Tensor, bounds: KeyBounds, scale: float, block: int,
                              rows: torch.Tensor, allowed: torch.Tensor, gamma: torch.Tensor, lo: torch.Tensor,
                              hi: torch.Tensor, *, tile_rows: int | None = None,
                              launch: tuple[int, int] | None = None, out_elements: int = OUT_ELEMENTS) -> torch.Tensor:
    """`[B, Hq, R, C]` float32 ProxyAttn block scores `k_{h,r} − rank` (`attnpatch.estimators.proxy.
    proxy_block_scores`): the statistics kernel, then `proxy_budget_triton`'s kernel per chunk — no
    `[B, H, R, C]` temporaries besides the output. `allowed` `[B, 1, R, C]`; `gamma`, `lo`, `hi` `[Hq]`.
    Raises ValueError on inputs either kernel declines."""
    reason = block_scores_unsupported_reason(query, key, bounds, block)
    if reason is not None:
        raise ValueError(f"proxy_block_scores_triton: {reason}")
    b, hq, lq, _ = query.shape
    cc = num_blocks(key.shape[2], block)
    out = torch.empty(b, hq, num_blocks(lq, block), cc, dtype=torch.float32, device=query.device)
    if out.numel() == 0:
        return out
    for r0, _, val in _chunk_statistics(query, key, bounds, scale, block, rows, tile_rows, launch, out_elements):
        budget_scores_triton(val, allowed, gamma, lo, hi, out, r0, rows.shape[1])
    return out
