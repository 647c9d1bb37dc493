"""Mean-pooled queries / keys and their scores, GQA-aware (K is never repeated per query head).

* `pool_queries` / `pool_blocks`: the mean of each run of `size` rows over its real (non-padding)
  tokens (a ragged last run averages the tokens it has; a run without a real token is 0);
* `pooled_scores`: `scale · q̄ · k` of pooled queries against every key (token-granularity methods:
  AnchorAttention, S2O);
* `pooled_block_attention`: the softmax attention of pooled query blocks over pooled key blocks
  (FlexPrefill's query-aware estimate, MInference's block-sparse estimate): `2·R·C·D` FLOPs and
  `R × C` floats per query head (blocks, never tokens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnpatch.estimators.keys import real_keys
from attnpatch.sparsity import KeyBounds
from attnpatch.sparsity.regions import allowed_blocks

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

def pool_blocks(x: torch.Tensor, block: int, real: torch.Tensor | None = None) -> torch.Tensor:
    """`[B, H, N, D]` float32: the mean of each block of `x [B, H, L, D]` over its real tokens (`real [B, L]`
    bool, None: all); `pool_queries` without the row counts."""
    return pool_queries(x, block, real)[0]


def pooled_block_attention(query: torch.Tensor, key: torch.Tensor, scale: float, bounds: KeyBounds,
                           block: int) -> torch.Tensor:
    """`[B, Hq, R, C]` float32: per query block, the softmax of `scale · mean(q) · mean(k)` over the key
    blocks some of its queries may see (causal, padding, window: `allowed_blocks`); rows without any
    such block are 0. Means are over real tokens only, so padding never shifts a score."""
    b, hq, lq, d = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    real = real_keys(bounds, b, lk, query.device)
    qreal = None if real is None else real[:, lk - lq:]
    pq = pool_blocks(query, block, qreal)  # [B, Hq, R, D]
    pk = pool_blocks(key, block, real)  # [B, Hkv, C, D]
    rows, cols = pq.shape[2], pk.shape[2]
    s = torch.matmul(pq.view(b, hkv, (hq // hkv) * rows, d), pk.transpose(-1, -2)).view(b, hq, rows, cols) * scale
    allowed = allowed_blocks(b, lq, lk, block, block, bounds, query.device)
    return torch.softmax(s.masked_fill_(~allowed, float("-inf")), dim=-1).nan_to_num_(0.0)
