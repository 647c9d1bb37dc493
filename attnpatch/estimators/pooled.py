"""Mean-pooled queries and their scores against keys, GQA-aware (K is never repeated per query head).

Token-granularity methods (AnchorAttention, S2O) score every key against a few pooled queries per query
block: `pool_queries` averages the real (non-padding) query rows of each sub-block, `pooled_scores`
returns `scale · q̄ · k` for every query head against its KV head's keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pool_queries(query: torch.Tensor, size: int, valid: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of each run of `size` query rows: `query [B, H, L, D]` → `(q̄ [B, H, ceil(L/size), D]` float32,
    `rows [B, 1, ceil(L/size)]` the number of rows averaged)`. `valid [B, L]` (bool) leaves padding rows
    out; a sub-block without a valid row gets q̄ = 0 and rows = 0 (callers drop it)."""
    b, h, length, d = query.shape
    n = -(-length // size)
    pad = n * size - length
    w = torch.ones(b, length, device=query.device) if valid is None else valid.to(query.device, torch.float32)
    w = F.pad(w, (0, pad)).view(b, 1, n, size)
    q = F.pad(query.float(), (0, 0, 0, pad)).view(b, h, n, size, d)
    rows = w.sum(-1)
    q_sum = torch.einsum("bhnsd,bxns->bhnd", q, w)
    return q_sum / rows.clamp(min=1).unsqueeze(-1), rows


def pooled_scores(qbar: torch.Tensor, key: torch.Tensor, scale: float, keys: int | None = None) -> torch.Tensor:
    """`scale · q̄ · kᵀ` as float32 `[B, Hq, M, keys]` for pooled queries `q̄ [B, Hq, M, D]` against the
    first `keys` keys (default all) of `key [B, Hkv, Lk, D]`; query head `h` reads KV head `h // G`.
    The product runs in the key's dtype (fp32 accumulation on GPU), without repeating K."""
    b, hq, m, d = qbar.shape
    hkv = key.shape[1]
    k = key if keys is None else key[:, :, :keys]
    q = qbar.to(k.dtype).reshape(b, hkv, (hq // hkv) * m, d)
    s = torch.matmul(q, k.transpose(-1, -2))
    return s.view(b, hq, m, k.shape[2]).float().mul_(scale)
