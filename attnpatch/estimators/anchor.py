"""AnchorAttention's anchors: the exact maximum scaled score of every query row over its sink ("init")
and local windows, mean-pooled per query block together with the queries themselves.

For query block `r` (rows at positions `first_r .. last_r`) the anchor keys are
`[init_lo_b, init_lo_b + init_len) ∪ [local_lo_{b,r}, last_r]`, seen per row under the causal rule and the
key bounds. Query blocks are processed in chunks: temporaries are O(chunk · Bq · (init_len + local_len)),
never L × L. The init keys are gathered once; a chunk's local windows are one contiguous slice of K
(never gathered per query block, never repeated per query head).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnpatch.estimators.pooled import pool_queries
from attnpatch.sparsity import KeyBounds, num_blocks
from attnpatch.sparsity.tokens import closed_bounds

_CHUNK_ELEMS = 1 << 26  # score elements per chunk of query blocks


def window_row_max(rows_q: torch.Tensor, keys: torch.Tensor, scale: float, ok: torch.Tensor) -> torch.Tensor:
    """Per query row, the max of `scale · q · k` over the keys where `ok` holds.

    `rows_q [B, Hq, n, Bq, D]`, `keys [B, Hkv, W, D]` (one window of keys shared by the `n` blocks),
    `ok [B|1, n, Bq, W]` bool. Returns float32 `[B, Hq, n, Bq]` (`-inf` for a row with no key). K is read
    per KV head (never repeated per query head) and never gathered per block."""
    b, hq, n, bq, d = rows_q.shape
    hkv = keys.shape[1]
    g = hq // hkv
    s = torch.matmul(rows_q.to(keys.dtype).reshape(b, hkv, g * n * bq, d), keys.transpose(-1, -2))
    s = s.view(b, hkv, g, n, bq, -1).masked_fill_(~ok.view(ok.shape[0], 1, 1, n, bq, -1), float("-inf"))
    return s.amax(-1).float().mul_(scale).view(b, hq, n, bq)


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
    # a chunk of blocks spans at most `local_len` queries, so its local slice is at most 2 · local_len keys
    # (one window when the blocks share a start, as AnchorAttention's big blocks do)
    chunk = max(1, min(_CHUNK_ELEMS // max(1, b * hq * block * width), local_len // block))
    valid = torch.ones(b, lq, dtype=torch.bool, device=device) if row_valid is None else row_valid.to(device)
    valid = F.pad(valid, (0, r_all * block - lq)).view(b, r_all, block)
    batch = torch.arange(b, device=device).view(b, 1)
    init_pos = init_lo.view(b, 1) + torch.arange(init_len, device=device)  # [B, init_len]
    init_keys = key[batch, :, init_pos.clamp(0, lk - 1)].transpose(1, 2)  # [B, Hkv, init_len, D], gathered once
    starts = local_lo.amin(0).clamp(min=0).tolist()  # one host sync: where each block's local window starts
    sums, counts = [], []
    for r0 in range(0, r_all, chunk):
        r1 = min(r_all, r0 + chunk)
        n = r1 - r0
        qpos = off + torch.arange(r0 * block, r1 * block, device=device).view(1, n, block, 1)
        # every block's local window [local_lo, last] lies in one contiguous slice of keys
        hi = off + min(r1 * block, lq)
        lo = max(0, min(min(starts[r0:r1]), hi - 1))  # one key at least (masked when no window)
        loc_pos = torch.arange(lo, hi, device=device).view(1, 1, 1, -1)
        rows_q = query[:, :, r0 * block:r1 * block]  # the ragged last chunk alone is padded (no copy of Q)
        rows_q = F.pad(rows_q, (0, 0, 0, n * block - rows_q.shape[2])).view(b, hq, n, block, d)
        in_local = loc_pos >= local_lo[:, r0:r1].view(b, n, 1, 1)
        seen_init = _seen(bounds, closed, qpos, init_pos.view(b, 1, 1, -1), r0, block, lq, lk, b)
        seen_local = in_local & _seen(bounds, closed, qpos, loc_pos, r0, block, lq, lk, b)
        best = torch.maximum(window_row_max(rows_q, init_keys, scale, seen_init),  # max over the union
                             window_row_max(rows_q, key[:, :, lo:hi], scale, seen_local))
        live = valid[:, r0:r1].unsqueeze(1) & torch.isfinite(best)
        sums.append(torch.where(live, best, 0.0).sum(-1))
        counts.append(live.sum(-1))
    total, rows_used = torch.cat(sums, -1), torch.cat(counts, -1)
    abar = torch.where(rows_used > 0, total / rows_used.clamp(min=1), float("inf"))
    # q̄ over the rows whose anchor is defined (the same rows for every head: padding rows are out).
    row_ok = valid.view(b, r_all * block)[:, :lq]
    qbar, rows = pool_queries(query, block, row_ok)
    return abar, qbar, rows


def _seen(bounds: KeyBounds, closed: KeyBounds, qpos: torch.Tensor, kpos: torch.Tensor, r0: int, block: int,
          q_len: int, kv_len: int, b: int) -> torch.Tensor:
    """`[B|1, n, Bq, W]` bool: may the query at `qpos [1, n, Bq, 1]` see the key at `kpos [B|1, 1, 1, W]`
    (causal, padding, window; a tensor mask read at the chunk's rows, blocks `r0 ..`)?"""
    ok = (kpos < kv_len) & (kpos >= 0) & closed.visible(qpos, kpos.clamp(0, kv_len - 1), b)
    if bounds.mask is not None:  # the closed part lost the mask's own padding: leave masked keys out
        n = qpos.shape[1]
        rows = torch.arange(r0 * block, (r0 + n) * block, device=qpos.device).clamp(max=q_len - 1)
        m = bounds.mask.any(1)[:, rows].view(-1, n, block, kv_len)
        ok = ok & torch.gather(m, -1, kpos.clamp(0, kv_len - 1).expand(m.shape[0], n, block, kpos.shape[-1]))
    return ok
