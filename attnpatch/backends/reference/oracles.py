"""PyTorch oracles of the Triton kernels' *tiled* semantics: the same tile order, skip rule, split
boundaries, seeding, resumable state and tile counters, so a kernel can be checked exactly against
them (the exact executors in `executors.py` define what is computed; these define how the kernels
walk it). float32, vectorised over batch/heads/blocks with one step per list slot: tests and small
inputs only."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from attnpatch.backends.decode_plan import check_decode, empty_result
from attnpatch.backends.inputs import pad_to
from attnpatch.backends.partial_state import check_state, finalize_state, pack_results
from attnpatch.backends.skip_bound import bound_per_head
from attnpatch.sparsity import BlockSelection, PageSelection, num_blocks

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453




def block_sparse_attention_tiled_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    selection: BlockSelection,
    scale: float | None = None,
    return_lse: bool = False,
    skip_bound: float | torch.Tensor | None = None,
    init_state: Sequence[torch.Tensor] | None = None,
    return_state: bool = False,
    count_tiles: bool = False,
):
    """PyTorch oracle of `attnpatch.backends.triton.block_sparse.block_sparse_attention_triton` with identical
    semantics, in float32.

    Walks the selected key blocks in the same ascending order as the kernel (vectorised over
    batch, heads and query blocks; one step per list slot) and applies the same skip rule, so it
    is the oracle for skip mode, resumable state and tile counters. Same arguments and returns.
    Memory is `O(B·Hq·Lq·block_k)` per step: meant for tests and small inputs.
    """
    b, hq, lq, d = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    dv = value.shape[-1]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    bq, bk = selection.block_q, selection.block_k
    n_qb, n_kb = num_blocks(lq, bq), num_blocks(lk, bk)
    group = hq // hkv
    offset = lk - lq
    device = query.device
    kmax = selection.indices.shape[-1]

    q = pad_to(query.float(), n_qb * bq).view(b, hq, n_qb, bq, d)
    kblocks = pad_to(key.float(), n_kb * bk).view(b, hkv, n_kb, bk, d)
    vblocks = pad_to(value.float(), n_kb * bk).view(b, hkv, n_kb, bk, dv)
    if init_state is None:
        m = torch.full((b, hq, n_qb * bq), float("-inf"), device=device)
        denom = torch.zeros(b, hq, n_qb * bq, device=device)
        acc = torch.zeros(b, hq, n_qb * bq, dv, device=device)
    else:
        m0, l0, a0 = check_state(init_state, b, hq, lq, dv)
        m = pad_to(m0.float().unsqueeze(-1), n_qb * bq).squeeze(-1)
        m[:, :, lq:] = float("-inf")
        denom = pad_to(l0.float().unsqueeze(-1), n_qb * bq).squeeze(-1)
        acc = pad_to(a0.float(), n_qb * bq)
    m = m.view(b, hq, n_qb, bq).clone()
    denom = denom.view(b, hq, n_qb, bq).clone()
    acc = acc.view(b, hq, n_qb, bq, dv).clone()

    thr = None
    if skip_bound is not None:
        thr = bound_per_head(skip_bound, hq, device).view(1, hq, 1, 1)
    rows = torch.arange(n_qb * bq, device=device).view(n_qb, bq)
    qpos = rows + offset
    row_ok = rows < lq
    bi = torch.arange(b, device=device).view(b, 1, 1)
    hi = (torch.arange(hq, device=device) // group).view(1, hq, 1)
    counts = selection.counts.to(device)
    skipped = torch.zeros((), dtype=torch.int64, device=device)
    neg_inf = float("-inf")

    for j in range(kmax):
        active = j < counts  # [B, Hq, R]
        kb = selection.indices[..., j].long().clamp(0, max(n_kb - 1, 0))
        kt, vt = kblocks[bi, hi, kb], vblocks[bi, hi, kb]  # [B, Hq, R, bk, D]
        s = torch.einsum("bhrqd,bhrkd->bhrqk", q, kt) * scale
        kpos = kb.unsqueeze(-1) * bk + torch.arange(bk, device=device)  # [B, Hq, R, bk]
        allowed = (kpos.unsqueeze(-2) <= qpos.unsqueeze(-1)) & (kpos < lk).unsqueeze(-2)
        s = s.masked_fill(~allowed, neg_inf)
        tmax = s.amax(-1)  # [B, Hq, R, bq]
        update = active
        if thr is not None:
            veto = (tmax - m >= thr) & (tmax > neg_inf) & row_ok
            skip = active & ~veto.any(-1)
            skipped += skip.sum()
            update = active & ~skip
        m_new = torch.where(update.unsqueeze(-1), torch.maximum(m, tmax), m)
        m_safe = torch.where(m_new == neg_inf, torch.zeros_like(m_new), m_new)
        alpha = torch.exp(m - m_safe)
        p = torch.exp(s - m_safe.unsqueeze(-1))
        u = update.unsqueeze(-1)
        denom = torch.where(u, denom * alpha + p.sum(-1), denom)
        pv = torch.einsum("bhrqk,bhrkd->bhrqd", p, vt)
        acc = torch.where(u.unsqueeze(-1), acc * alpha.unsqueeze(-1) + pv, acc)
        m = m_new

    m = m.view(b, hq, -1)[:, :, :lq]
    denom = denom.view(b, hq, -1)[:, :, :lq]
    acc = acc.view(b, hq, -1, dv)[:, :, :lq]
    out, lse = finalize_state((m, denom, acc), query.dtype)
    tiles = None
    if count_tiles:
        tiles = (counts.sum(dtype=torch.int64), skipped)
    primary = (m.contiguous(), denom.contiguous(), acc.contiguous()) if return_state else out
    return pack_results(primary, lse if return_lse else None, tiles)




def sparse_decode_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    selection: PageSelection,
    scale: float | None = None,
    return_lse: bool = False,
    skip_bound: float | torch.Tensor | None = None,
    num_splits: int | None = None,
    count_tiles: bool = False,
    seed_max: bool = True,
    tile_size: int | None = None,
):
    """PyTorch oracle of `attnpatch.backends.triton.decode.sparse_decode_attention`: same tiles, split boundaries,
    seeding and skip rule.

    Vectorised over (B·Hkv, splits, G); loops over the tile position inside a split. fp32 math,
    memory O(selected keys). Same arguments and results as the kernel wrapper (also on CPU
    without triton).
    """
    scale, tile, splits = check_decode(query, key, value, selection, scale, tile_size, num_splits,
                                       "sparse_decode_attention_reference")
    b, hq, _, d = query.shape
    hkv, lk, dv = key.shape[1], key.shape[2], value.shape[-1]
    p = selection.indices.shape[-1]
    if b * hq == 0 or lk == 0 or p == 0:
        return empty_result(query, value, return_lse, count_tiles)
    device = query.device
    group, ps = hq // hkv, selection.page_size
    ppt = tile // ps
    bh = b * hkv
    n_t = num_blocks(p, ppt)  # tile slots of the widest list
    skip = skip_bound is not None
    thr = bound_per_head(skip_bound, hq, device, base2=True).view(hkv, group) if skip else None
    seeded = skip and seed_max

    cnt = selection.counts.to(device=device, dtype=torch.int64).reshape(bh).clamp(0, p)
    idx = selection.indices.to(device=device, dtype=torch.int64).reshape(bh, p)
    idx = torch.cat([idx, idx.new_zeros(bh, n_t * ppt - p)], dim=1)
    entry_ok = torch.arange(n_t * ppt, device=device) < cnt[:, None]  # [BH, T·ppt]
    pos = torch.where(entry_ok, idx, 0)[..., None] * ps + torch.arange(ps, device=device)
    ok = (entry_ok[..., None] & (pos >= 0) & (pos < lk)).reshape(bh, n_t, tile)
    pos = pos.clamp(0, lk - 1).reshape(bh, n_t, tile)
    bi = torch.arange(b, device=device).repeat_interleave(hkv).view(bh, 1, 1)
    hi = torch.arange(hkv, device=device).repeat(b).view(bh, 1, 1)
    kg = key[bi, hi, pos].float()  # [BH, T, tile, D]
    vg = value[bi, hi, pos].float()  # [BH, T, tile, Dv]
    q = query.reshape(b, hq, d).reshape(bh, group, d).float()
    s2 = torch.einsum("bgd,btnd->btgn", q, kg) * (scale * _LOG2E)  # base-2 scaled scores
    s2 = s2.masked_fill(~ok[:, :, None, :], float("-inf"))  # [BH, T, G, tile]
    m_tile = s2.amax(-1)  # [BH, T, G]

    n_tiles = torch.div(cnt + ppt - 1, ppt, rounding_mode="floor")  # [BH]
    per_split = torch.div(n_tiles + splits - 1, splits, rounding_mode="floor")
    if seeded:
        m = m_tile[:, 0, :].clone()[:, None, :].expand(bh, splits, group).clone()
    else:
        m = torch.full((bh, splits, group), float("-inf"), device=device)
    denom = torch.zeros(bh, splits, group, device=device)
    acc = torch.zeros(bh, splits, group, dv, device=device)
    visited = torch.zeros((), dtype=torch.int64, device=device)
    skipped = torch.zeros((), dtype=torch.int64, device=device)
    ar = torch.arange(bh, device=device)[:, None]
    thr_rows = thr.repeat(b, 1)[:, None, :] if skip else None  # [BH, 1, G]
    split_ids = torch.arange(splits, device=device)[None, :]
    for j in range(int(per_split.max().item()) if bh else 0):
        t = split_ids * per_split[:, None] + j  # [BH, S] global tile index
        active = (j < per_split[:, None]) & (t < n_tiles[:, None])
        tc = t.clamp(max=n_t - 1)
        st = s2[ar, tc]  # [BH, S, G, tile]
        mt = m_tile[ar, tc]  # [BH, S, G]
        do = active
        if skip:
            row_skip = ((mt - m) < thr_rows) | (mt == float("-inf"))
            tile_skip = row_skip.all(-1) & (t != 0)
            do = active & ~tile_skip
            skipped += (active & tile_skip).sum()
        visited += active.sum()
        m_new = torch.maximum(m, mt)
        m_ref = torch.where(m_new == float("-inf"), torch.zeros_like(m_new), m_new)
        alpha = torch.exp2(m - m_ref)
        pr = torch.exp2(st - m_ref[..., None])
        l_new = denom * alpha + pr.sum(-1)
        acc_new = acc * alpha[..., None] + torch.matmul(pr, vg[ar, tc])
        sel = do[..., None]
        m = torch.where(sel, m_new, m)
        denom = torch.where(sel, l_new, denom)
        acc = torch.where(sel[..., None], acc_new, acc)

    # merge the splits by log-sum-exp (base 2)
    mm = m.amax(1, keepdim=True)
    mm_ref = torch.where(mm == float("-inf"), torch.zeros_like(mm), mm)
    w = torch.exp2(m - mm_ref)
    tot = (denom * w).sum(1)  # [BH, G]
    num = (acc * w[..., None]).sum(1)
    seen = tot > 0
    safe = torch.where(seen, tot, torch.ones_like(tot))
    out = (num / safe[..., None]).reshape(b, hq, 1, dv).to(query.dtype)
    lse = None
    if return_lse:
        lse = torch.where(seen, (mm_ref[:, 0] + torch.log2(safe)) * _LN2, torch.full_like(tot, float("-inf")))
        lse = lse.reshape(b, hq, 1)
    return pack_results(out, lse, (visited, skipped) if count_tiles else None)
