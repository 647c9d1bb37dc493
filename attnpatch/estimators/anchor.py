"""AnchorAttention's anchors: the exact maximum scaled score of every query row over its sink ("init")
and local windows, mean-pooled per query block together with the queries themselves.

For query block `r` (rows at positions `first_r .. last_r`) the anchor keys are
`[init_lo_b, init_lo_b + init_len) ∪ [local_lo_{b,r}, last_r]`, seen per row under the causal rule and the
key bounds. Query blocks are processed in chunks: temporaries are O(chunk · Bq · (init_len + local_len)),
never L × L; K is gathered per chunk window, never repeated per query head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnpatch.estimators.pooled import pool_queries
from attnpatch.sparsity import KeyBounds, num_blocks
from attnpatch.sparsity.tokens import closed_bounds

_CHUNK_ELEMS = 1 << 25  # score elements per chunk of query blocks


def window_row_max(qblocks: torch.Tensor, key: torch.Tensor, scale: float, pos: torch.Tensor,
                   ok: torch.Tensor) -> torch.Tensor:
    """Per query row, the max of `scale · q · k` over the keys at `pos` where `ok` holds.

    `qblocks [B, Hq, n, Bq, D]`, `key [B, Hkv, Lk, D]`, `pos [B|1, n, W]` (int64, clamped into range here),
    `ok [B|1, n, Bq, W]` bool. Returns float32 `[B, Hq, n, Bq]` (`-inf` for a row with no key)."""
    b, hq, n, bq, d = qblocks.shape
    hkv, lk = key.shape[1], key.shape[2]
    g = hq // hkv
    idx = pos.clamp(0, lk - 1).expand(b, n, pos.shape[-1])
    kg = key.transpose(1, 2)[torch.arange(b, device=key.device).view(b, 1, 1), idx]  # [B, n, W, Hkv, D]
    kg = kg.permute(0, 3, 1, 4, 2)  # [B, Hkv, n, D, W]
    q = qblocks.to(key.dtype).view(b, hkv, g, n, bq, d).transpose(2, 3).reshape(b, hkv, n, g * bq, d)
    s = torch.matmul(q, kg).view(b, hkv, n, g, bq, -1)
    s = s.masked_fill(~ok.view(ok.shape[0], 1, n, 1, bq, -1), float("-inf"))
    m = s.amax(-1).float().mul_(scale)  # [B, Hkv, n, G, Bq]
    return m.transpose(2, 3).reshape(b, hq, n, bq)


def pooled_anchors(query: torch.Tensor, key: torch.Tensor, scale: float, block: int, init_lo: torch.Tensor,
                   init_len: int, local_lo: torch.Tensor, local_len: int, bounds: KeyBounds,
                   row_valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Anchors and pooled queries of every query block of `block` rows.

    `init_lo [B]` each row's first real key, `local_lo [B, R]` each block's local-window start (keys from
    there up to the block's last query), `init_len` / `local_len` the window widths to scan (the local
    window of block `r` must fit in `local_len` keys). `row_valid [B, Lq]`: queries that are not padding.

    Returns `(ā [B, Hq, R]` the mean over the block's valid rows of the row maxima (natural-log scaled
    scores; `+inf` for a block without a valid row, so it selects nothing), `q̄ [B, Hq, R, D]` float32 the
    mean of the same rows, `rows [B, 1, R]` how many rows were averaged)`."""
    b, hq, lq, d = query.shape
    lk = key.shape[2]
    r_all = num_blocks(lq, block)
    device = query.device
    off = lk - lq
    closed = closed_bounds(bounds, b, device)
    width = init_len + local_len
    chunk = max(1, _CHUNK_ELEMS // max(1, b * hq * block * width))
    valid = torch.ones(b, lq, dtype=torch.bool, device=device) if row_valid is None else row_valid.to(device)
    valid = F.pad(valid, (0, r_all * block - lq)).view(b, r_all, block)
    sums, counts = [], []
    for r0 in range(0, r_all, chunk):
        r1 = min(r_all, r0 + chunk)
        n = r1 - r0
        qpos = off + torch.arange(r0 * block, r1 * block, device=device).view(1, n, block, 1)
        init_pos = (init_lo.view(b, 1, 1) + torch.arange(init_len, device=device)).expand(b, n, init_len)
        loc_pos = local_lo[:, r0:r1].unsqueeze(-1) + torch.arange(local_len, device=device)
        pos = torch.cat([init_pos, loc_pos], dim=-1)  # [B, n, W]
        in_init = torch.arange(width, device=device) < init_len
        kpos = pos.unsqueeze(2)  # [B, n, 1, W]
        ok = (kpos < lk) & (kpos >= 0) & closed.visible(qpos, kpos.clamp(0, lk - 1), b)
        if bounds.mask is not None:  # the closed part lost the mask's own padding: leave masked keys out
            rows = torch.arange(r0 * block, r1 * block, device=device).clamp(max=lq - 1)
            m = bounds.mask.any(1)[:, rows].view(b, n, block, lk)
            ok = ok & torch.gather(m, -1, kpos.clamp(0, lk - 1).expand(b, n, block, width))
        ok = ok & (in_init | (kpos >= local_lo[:, r0:r1].view(b, n, 1, 1)))
        rows_q = query[:, :, r0 * block:r1 * block]  # the ragged last chunk alone is padded (no copy of Q)
        rows_q = F.pad(rows_q, (0, 0, 0, n * block - rows_q.shape[2])).view(b, hq, n, block, d)
        row_max = window_row_max(rows_q, key, scale, pos, ok)  # [B, Hq, n, Bq]
        live = valid[:, r0:r1].unsqueeze(1) & torch.isfinite(row_max)
        sums.append(torch.where(live, row_max, 0.0).sum(-1))
        counts.append(live.sum(-1))
    total, rows_used = torch.cat(sums, -1), torch.cat(counts, -1)
    abar = torch.where(rows_used > 0, total / rows_used.clamp(min=1), float("inf"))
    # q̄ over the rows whose anchor is defined (the same rows for every head: padding rows are out).
    row_ok = valid.view(b, r_all * block)[:, :lq]
    qbar, rows = pool_queries(query, block, row_ok)
    return abar, qbar, rows
