"""Token-level visibility for estimators that score a few query rows against some keys: the causal rule,
padding, sliding windows and tensor masks (`KeyBounds`), without an Lq×Lk tensor."""

from __future__ import annotations

import torch

from attnpatch.sparsity import KeyBounds


def visible(bounds: KeyBounds, rows: torch.Tensor, keys: torch.Tensor, q_len: int, kv_len: int,
            batch: int) -> torch.Tensor:
    """`[B | 1, n, m]` bool: may query row `rows[i]` (index into the call's queries, `[n]`) see key
    position `keys[..., i | 0, j]` (`[m]`, or `[B | 1, n | 1, m]`)? Keys outside `[0, kv_len)` are
    never visible. A tensor mask is read at those rows only (any head: one answer for all heads)."""
    if keys.dim() == 1:
        keys = keys.view(1, 1, -1)
    qpos = (rows + (kv_len - q_len)).view(1, -1, 1)
    inside = (keys >= 0) & (keys < kv_len)
    kpos = keys.clamp(0, max(kv_len - 1, 0))
    if bounds.mask is None:
        return bounds.visible(qpos, kpos, batch) & inside
    mask = bounds.mask.to(rows.device)[:, :, rows, :].any(1)  # [B, n, Lk]
    shape = torch.broadcast_shapes(tuple(mask.shape[:2]) + (kpos.shape[-1],), tuple(kpos.shape))
    picked = torch.gather(mask.expand(*shape[:2], kv_len), -1, kpos.expand(shape))
    return picked & (kpos <= qpos) & inside


def real_positions(bounds: KeyBounds, batch: int, kv_len: int, device) -> torch.Tensor:
    """`[B, Lk]` bool: positions holding a real (non-padding) token; with a tensor mask, the keys
    some query may see."""
    pos = torch.arange(kv_len, device=device)
    if bounds.key_valid is not None:
        return bounds.key_valid.to(device=device, dtype=torch.bool).expand(batch, kv_len)
    if bounds.mask is not None:
        return bounds.mask.to(device).any(dim=(1, 2)).expand(batch, kv_len)
    if bounds.key_start is not None:
        return pos.view(1, -1) >= bounds.key_start.to(device).view(-1, 1)
    return torch.ones(batch, kv_len, dtype=torch.bool, device=device)
