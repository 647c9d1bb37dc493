"""Mean-pooled queries and their scores against keys, GQA-aware (K is never repeated per query head).

Token-granularity methods (AnchorAttention, S2O) score every key against a few pooled queries per query
block: `pool_queries` averages the real (non-padding) query rows of each sub-block, `pooled_scores`
returns `scale · q̄ · k` for every query head against its KV head's keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_CHUNK_ELEMS = 1 << 24  # query elements pooled per slice


def pool_queries(query: torch.Tensor, size: int, valid: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of each run of `size` query rows: `query [B, H, L, D]` → `(q̄ [B, H, ceil(L/size), D]` float32,
    `rows [B, 1, ceil(L/size)]` the number of rows averaged)`. `valid [B, L]` (bool) leaves padding rows
    out; a sub-block without a valid row gets q̄ = 0 and rows = 0 (callers drop it)."""
    b, h, length, d = query.shape
    n = -(-length // size)
    w = torch.ones(b, length, device=query.device) if valid is None else valid.to(query.device, torch.float32)
    w = F.pad(w, (0, n * size - length)).view(b, 1, n, size)
    rows = w.sum(-1)
    out = torch.empty(b, h, n, d, dtype=torch.float32, device=query.device)
    step = max(1, _CHUNK_ELEMS // max(1, b * h * size * d))  # sub-blocks per slice: no fp32 copy of Q
    for c0 in range(0, n, step):
        c1 = min(n, c0 + step)
        part = query[:, :, c0 * size:c1 * size].float()
        part = F.pad(part, (0, 0, 0, (c1 - c0) * size - part.shape[2])).view(b, h, c1 - c0, size, d)
        out[:, :, c0:c1] = torch.einsum("bhnsd,bns->bhnd", part, w[:, 0, c0:c1])
    return out / rows.clamp(min=1).unsqueeze(-1), rows


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
