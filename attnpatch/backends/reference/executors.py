"""Exact block-sparse attention in PyTorch: the reference every fast kernel is tested against.

Memory is O(L · kept): query blocks are processed in chunks, and each chunk gathers only the key
blocks its selection names. No L×L tensor is built: padding and sliding windows come in closed
form (`KeyBounds`); an arbitrary 4D boolean mask, when that is all there is, is read block by block,
never expanded. Differentiable (autograd through the gathered blocks; rows that see no key get a
zero output and zero gradient).
"""

from __future__ import annotations

import math

import torch

from attnpatch.backends.inputs import pad_to
from attnpatch.sparsity import BlockSelection, KeyBounds, PageSelection, TokenSelection, num_blocks

_CHUNK_BYTES = 256 * 2**20


def block_sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    selection: BlockSelection,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
    return_lse: bool = False,
    tile_counts: torch.Tensor | None = None,
    skipped_out: torch.Tensor | None = None,
    bounds: KeyBounds | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of each query block over its selected key blocks.

    query `[B, Hq, Lq, D]`, key/value `[B, Hkv, Lk, D]` (GQA: `Hq` a multiple of `Hkv`, never
    repeated in memory beyond the gathered blocks). `bounds`: padding / sliding window in closed
    form (or a tensor mask in `bounds.mask`); `mask`: optional boolean `[B, 1|Hq, Lq, Lk]` (True =
    may attend). Both are combined with the causal rule. Returns `[B, Hq, Lq, D]` in the query's
    dtype and, on request, the natural-log log-sum-exp `[B, Hq, Lq]` in float32 (`-inf` for rows
    that see no key; their output is 0).

    With `selection.skip` (BLASST), tiles are visited in slot order and a tile is dropped when every
    row of the (query head, query block) finds it negligible against its running max; since a
    dropped tile can never raise the running max, the running max before slot k is the exclusive
    cumulative max of the tile maxima, which this reference computes in closed form.
    `tile_counts` (int64 `[2]`), if given, is incremented by (visited tiles, skipped tiles);
    `skipped_out` (bool `[B, Hq, R, K]`), if given, receives which selection slots were skipped.
    """
    b, hq, lq, d = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    if (selection.q_len, selection.kv_len) != (lq, lk):
        raise ValueError(f"selection built for q_len={selection.q_len}, kv_len={selection.kv_len}; got {lq}, {lk}")
    sb, sh = selection.counts.shape[:2]
    if sb != b or sh != hq:
        raise ValueError(f"selection has batch×heads {sb}×{sh}, query has {b}×{hq}")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if bounds is not None and bounds.mask is not None:
        if mask is not None:
            raise ValueError("pass a tensor mask either as `mask` or in `bounds`, not both")
        mask, bounds = bounds.mask, None
    closed = bounds if bounds is not None and not bounds.is_plain else None
    grad = _needs_grad(query, key, value)
    bq, bk = selection.block_q, selection.block_k
    n_qb, n_kb = num_blocks(lq, bq), num_blocks(lk, bk)
    group = hq // hkv
    dv = value.shape[-1]
    device = query.device
    compute = torch.float32

    # A selection shared by all heads (stride 0 over heads) is gathered once per KV head and the
    # G query heads of the group are stacked as extra rows: G times less gathering.
    shared = selection.indices.stride(1) == 0 and selection.counts.stride(1) == 0
    heads, rows = (hkv, group * bq) if shared else (hq, bq)
    q = pad_to(query, n_qb * bq, 2).view(b, hq, n_qb, bq, d)
    if shared:
        q = q.view(b, hkv, group, n_qb, bq, d).transpose(2, 3).reshape(b, hkv, n_qb, rows, d)
        sel_idx, sel_cnt = selection.indices[:, :1], selection.counts[:, :1]
        hi = torch.arange(hkv, device=device).view(1, hkv, 1, 1)
    else:
        sel_idx, sel_cnt = selection.indices, selection.counts
        hi = (torch.arange(hq, device=device) // group).view(1, hq, 1, 1)
    kblocks = pad_to(key, n_kb * bk, 2).view(b, hkv, n_kb, bk, d)
    vblocks = pad_to(value, n_kb * bk, 2).view(b, hkv, n_kb, bk, dv)
    kmax = sel_idx.shape[-1]
    bi = torch.arange(b, device=device).view(b, 1, 1, 1)
    k_in_block = torch.arange(bk, device=device)
    row_pos = torch.arange(bq, device=device).repeat(rows // bq)  # query offset inside the block, per row
    pad_mask = pad_to(mask, n_qb * bq, 2) if mask is not None else None

    out = torch.zeros(b, heads, n_qb, rows, dv, device=device, dtype=query.dtype)
    lse = torch.full((b, heads, n_qb, rows), float("-inf"), device=device, dtype=compute) if return_lse else None
    per_qblock = b * heads * rows * kmax * bk * 4 * 3
    chunk = max(1, min(n_qb, _CHUNK_BYTES // max(per_qblock, 1)))
    for r0 in range(0, n_qb, chunk):
        r1 = min(n_qb, r0 + chunk)
        n = r1 - r0
        idx = sel_idx[:, :, r0:r1, :].long().clamp(0, n_kb - 1).expand(b, heads, n, kmax)
        kept = torch.arange(kmax, device=device) < sel_cnt[:, :, r0:r1].unsqueeze(-1)
        kg = kblocks[bi, hi, idx].reshape(b, heads, n, kmax * bk, d).to(compute)
        vg = vblocks[bi, hi, idx].reshape(b, heads, n, kmax * bk, dv).to(compute)
        scores = torch.matmul(q[:, :, r0:r1].to(compute), kg.transpose(-1, -2)).mul_(scale)

        kpos = (idx.unsqueeze(-1) * bk + k_in_block).reshape(b, heads, n, 1, kmax * bk)
        kvalid = (kept.unsqueeze(-1) & (idx.unsqueeze(-1) * bk + k_in_block < lk)).reshape(b, heads, n, 1, kmax * bk)
        qpos = (torch.arange(r0, r1, device=device).view(n, 1) * bq + row_pos).view(1, 1, n, rows, 1)
        # Invalid slots get a position no query reaches, so one comparison applies causal + validity.
        kpos_eff = torch.where(kvalid, kpos, lk + lq)
        blocked = (kpos_eff > qpos + (lk - lq)) | (qpos >= lq)  # padding rows of the last block see nothing
        if closed is not None:
            blocked |= ~closed.visible(qpos + (lk - lq), kpos.clamp(max=lk - 1), b)
        if pad_mask is not None:
            mrows = pad_mask[:, :, r0 * bq : r1 * bq].reshape(b, pad_mask.shape[1], n, bq, lk)
            if shared and pad_mask.shape[1] > 1:
                raise ValueError("a per-head mask needs a per-head selection")
            mrows = mrows.repeat(1, 1, 1, rows // bq, 1).expand(b, heads, n, rows, lk)
            cols = kpos.clamp(max=lk - 1).expand(b, heads, n, rows, kmax * bk)
            blocked |= ~torch.gather(mrows, -1, cols)
        scores = scores.masked_fill(blocked, float("-inf")) if grad else scores.masked_fill_(blocked, float("-inf"))
        if selection.skip is not None:
            skipped = _skip_tiles(scores, kept, selection.skip.log_threshold, shared, group, bq, kmax, bk)
            scores = scores.masked_fill(skipped.repeat_interleave(bq if shared else rows, -2).unsqueeze(-1)
                                        .expand(-1, -1, -1, -1, -1, bk).reshape(scores.shape), float("-inf"))
            if tile_counts is not None:
                visited = kept.sum() * (hq if shared else 1)
                tile_counts += torch.stack([visited, skipped.sum()]).to(tile_counts)
            if skipped_out is not None:  # [B, heads, n, G or 1, K] -> [B, Hq, n, K]
                per_head = skipped.permute(0, 1, 3, 2, 4).reshape(b, hq, n, kmax)
                skipped_out[:, :, r0:r1] = per_head
        elif tile_counts is not None:
            tile_counts[0] += kept.sum() * (hq if shared else 1)
        if return_lse:
            lse[:, :, r0:r1] = torch.logsumexp(scores.detach(), dim=-1)
        probs = _probabilities(scores, grad)
        out[:, :, r0:r1] = torch.matmul(probs, vg).to(out.dtype)

    if shared:
        out = out.view(b, hkv, n_qb, group, bq, dv).transpose(2, 3)
        lse = lse.view(b, hkv, n_qb, group, bq).transpose(2, 3) if return_lse else None
    out = out.reshape(b, hq, n_qb * bq, dv)[:, :, :lq]
    if not return_lse:
        return out
    return out, lse.reshape(b, hq, n_qb * bq)[:, :, :lq]


def safe_softmax(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim where rows with no finite score give zeros (differentiable; the
    executors use an in-place variant when no gradient is needed)."""
    seen = torch.isfinite(scores).any(-1, keepdim=True)
    return torch.softmax(scores.masked_fill(~seen, 0.0), dim=-1) * seen


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _probabilities(scores: torch.Tensor, grad: bool) -> torch.Tensor:
    """`safe_softmax` when a gradient is needed; else the same values with the masked rows zeroed in place."""
    return safe_softmax(scores) if grad else torch.softmax(scores, dim=-1).nan_to_num_(0.0)


def _exclusive_cummax(x: torch.Tensor) -> torch.Tensor:
    prev = torch.cummax(x, dim=-1).values
    return torch.cat([torch.full_like(prev[..., :1], float("-inf")), prev[..., :-1]], dim=-1)


def negligible_rows(tile_max: torch.Tensor, threshold: torch.Tensor | float) -> torch.Tensor:
    """Per row and tile: the tile cannot matter (all masked, or its max is below running max + threshold)."""
    running = _exclusive_cummax(tile_max)
    return (tile_max == float("-inf")) | (tile_max - running < threshold)


def _skip_tiles(scores, kept, log_threshold, shared, group, bq, kmax, bk) -> torch.Tensor:
    """Skip decision per (batch, query head, query block, slot): `[B, Hq or Hkv·G…, n, rows/bq, K]`."""
    b, heads, n, rows, _ = scores.shape
    tile_max = scores.view(b, heads, n, rows, kmax, bk).amax(-1)  # [B, heads, n, rows, K]
    thr = log_threshold
    if isinstance(thr, torch.Tensor):
        thr = thr.to(scores.device, scores.dtype)
        thr = thr.view(heads, group).repeat_interleave(bq, -1).view(1, heads, 1, rows, 1) if shared else \
            thr.view(1, heads, 1, 1, 1)
    groups = (b, heads, n, rows // bq if shared else 1, bq if shared else rows, kmax)
    per_head = negligible_rows(tile_max, thr).view(groups).all(-2)
    live = (tile_max > float("-inf")).view(groups).any(-2)  # fully masked tiles are not counted as skips
    return per_head & live & kept.unsqueeze(-2)  # [B, heads, n, G or 1, K]


def merge_partials(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two normalised partial attentions over disjoint key sets by their log-sum-exps."""
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    wa = torch.exp(lse_a - safe).unsqueeze(-1)
    wb = torch.exp(lse_b - safe).unsqueeze(-1)
    out = wa * out_a.float() + wb * out_b.float()
    return out.to(out_a.dtype), lse


def _token_chunks(counts: torch.Tensor, kmax: int, bytes_per_key: int) -> list[tuple[int, int, int]]:
    """`(first, end, keys)` runs of query blocks for `token_gather_attention`: each run gathers only as many
    key slots as its fullest block lists (`keys`; causal lists grow along the rows), and holds at most
    `_CHUNK_BYTES` (`bytes_per_key` per query block and key slot) unless one block alone needs more."""
    per_block = counts.amax(dim=(0, 1)).clamp(min=1, max=max(kmax, 1)).tolist() if counts.numel() else []
    runs, r0, widest = [], 0, 0
    for r, n in enumerate(per_block):
        grown = max(widest, n)
        if r > r0 and (r - r0 + 1) * grown * bytes_per_key > _CHUNK_BYTES:
            runs.append((r0, r, widest))
            r0, grown = r, n
        widest = grown
    if per_block:
        runs.append((r0, len(per_block), widest))
    return runs


def token_gather_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    selection: TokenSelection,
    scale: float | None = None,
    return_lse: bool = False,
    bounds: KeyBounds | None = None,
):
    """Exact attention of each query block over its selected key positions (causal per token, plus
    `bounds`: padding, sliding window, or a tensor mask in `bounds.mask`).

    Shapes as `block_sparse_attention`. Query blocks run in chunks of about `_CHUNK_BYTES` of gathered
    keys, values and scores, so memory stays O(chunk rows · K) for K selected keys per query block.
    """
    b, hq, lq, d = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    if (selection.q_len, selection.kv_len) != (lq, lk):
        raise ValueError(f"selection built for q_len={selection.q_len}, kv_len={selection.kv_len}; got {lq}, {lk}")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    bq, group = selection.block_q, hq // hkv
    n_qb, kmax = num_blocks(lq, bq), selection.indices.shape[-1]
    device = query.device
    bi = torch.arange(b, device=device).view(b, 1, 1, 1)
    hi = (torch.arange(hq, device=device) // group).view(1, hq, 1, 1)
    q_all = pad_to(query, n_qb * bq, 2).view(b, hq, n_qb, bq, d)
    mask = None if bounds is None else bounds.mask
    if mask is not None:
        mask = pad_to(mask, n_qb * bq, 2).view(b, mask.shape[1], n_qb, bq, lk)
    grad = _needs_grad(query, key, value)
    outs, lses = [], []
    for r0, r1, kc in _token_chunks(selection.counts, kmax, 4 * b * hq * (2 * d + 2 * bq)):
        pos = selection.indices[:, :, r0:r1, :kc].long().clamp(0, lk - 1)  # [B,H,r,K]
        kept = torch.arange(kc, device=device) < selection.counts[:, :, r0:r1].unsqueeze(-1)
        kg = key[bi, hi, pos].float()  # [B,H,r,K,D]
        vg = value[bi, hi, pos].float()
        scores = torch.matmul(q_all[:, :, r0:r1].float(), kg.transpose(-1, -2)) * scale  # [B,H,r,bq,K]
        del kg
        qpos = (torch.arange(r0, r1, device=device).view(-1, 1) * bq + torch.arange(bq, device=device)) + (lk - lq)
        ok = kept.unsqueeze(-2) & (pos.unsqueeze(-2) <= qpos.view(1, 1, r1 - r0, bq, 1))
        if mask is not None:
            mrows = mask[:, :, r0:r1].expand(b, hq, r1 - r0, bq, lk)
            ok = ok & torch.gather(mrows, -1, pos.unsqueeze(-2).expand(b, hq, r1 - r0, bq, kc))
        elif bounds is not None and not bounds.is_plain:
            ok = ok & bounds.visible(qpos.view(1, 1, r1 - r0, bq, 1), pos.unsqueeze(-2), b)
        scores = scores.masked_fill(~ok, float("-inf")) if grad else scores.masked_fill_(~ok, float("-inf"))
        if return_lse:
            lses.append(torch.logsumexp(scores.detach(), -1))
        probs = _probabilities(scores, grad)
        outs.append(torch.matmul(probs, vg).to(query.dtype))
    out = torch.cat(outs, 2).reshape(b, hq, n_qb * bq, -1)[:, :, :lq]
    if not return_lse:
        return out
    return out, torch.cat(lses, 2).reshape(b, hq, n_qb * bq)[:, :, :lq]


def paged_decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    selection: PageSelection,
    scale: float | None = None,
    return_lse: bool = False,
    tile_counts: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    bounds: KeyBounds | None = None,
):
    """Exact single-token attention over the selected pages of each KV head.

    query `[B, Hq, 1, D]`, key/value `[B, Hkv, L, D]` (the cache); the G query heads of a KV head
    share its pages. `bounds` (padding, sliding window, or a tensor mask whose last query row is
    used) and/or `key_mask` `[B, L]` (True = may attend) restrict the keys.
    Returns `[B, Hq, 1, D]` (and the LSE `[B, Hq, 1]`). With `selection.skip`, pages are tiles
    visited in list order and `tile_counts` counts (visited, skipped) pages per KV head.
    """
    b, hq, one, d = query.shape
    if one != 1:
        raise ValueError(f"decode attention takes one query token, got {one}")
    hkv, lk = key.shape[1], key.shape[2]
    if selection.kv_len != lk:
        raise ValueError(f"selection built for kv_len={selection.kv_len}; got {lk}")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    group, ps, pmax = hq // hkv, selection.page_size, selection.indices.shape[-1]
    device = query.device
    pos = (selection.indices.long().unsqueeze(-1) * ps + torch.arange(ps, device=device)).reshape(b, hkv, pmax * ps)
    kept = (torch.arange(pmax, device=device) < selection.counts.unsqueeze(-1)).repeat_interleave(ps, -1) & (pos < lk)
    bi = torch.arange(b, device=device).view(b, 1, 1)
    hi = torch.arange(hkv, device=device).view(1, hkv, 1)
    if bounds is not None and bounds.mask is not None:
        row = bounds.mask[:, 0, -1, :]
        key_mask = row if key_mask is None else key_mask.bool() & row
    elif bounds is not None and not bounds.is_plain:
        qpos = torch.tensor(lk - 1, device=device)
        kept = kept & bounds.visible(qpos, pos.clamp(max=lk - 1), b)
    if key_mask is not None:
        kept = kept & torch.gather(key_mask.bool().unsqueeze(1).expand(b, hkv, lk), -1, pos.clamp(max=lk - 1))
    kg = key[bi, hi, pos.clamp(max=lk - 1)].float()  # [B,Hkv,P*ps,D]
    vg = value[bi, hi, pos.clamp(max=lk - 1)].float()
    q = query.view(b, hkv, group, d).float()
    scores = torch.matmul(q, kg.transpose(-1, -2)) * scale  # [B,Hkv,G,P*ps]
    scores = scores.masked_fill(~kept.unsqueeze(-2), float("-inf"))
    page_kept = torch.arange(pmax, device=device) < selection.counts.unsqueeze(-1)  # [B,Hkv,P]
    if selection.skip is not None:
        # Pages in list order, no split: the G heads of a KV head skip a page jointly (one V load).
        thr = selection.skip.log_threshold
        if isinstance(thr, torch.Tensor):
            thr = thr.to(device, scores.dtype).view(1, hkv, group, 1)
        tile_max = scores.view(b, hkv, group, pmax, ps).amax(-1)
        live = (tile_max > float("-inf")).any(-2)
        skipped = negligible_rows(tile_max, thr).all(-2) & live & page_kept  # [B,Hkv,P]
        scores = scores.masked_fill(skipped.repeat_interleave(ps, -1).unsqueeze(-2), float("-inf"))
        if tile_counts is not None:
            tile_counts += torch.stack([page_kept.sum(), skipped.sum()]).to(tile_counts)
    elif tile_counts is not None:
        tile_counts[0] += page_kept.sum()
    lse = torch.logsumexp(scores.detach(), -1)
    grad = _needs_grad(query, key, value)
    probs = _probabilities(scores, grad)
    out = torch.matmul(probs, vg).view(b, hq, 1, -1).to(query.dtype)
    return (out, lse.view(b, hq, 1)) if return_lse else out
