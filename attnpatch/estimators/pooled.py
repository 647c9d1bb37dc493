"""Mean-pooled block scores: each block of queries / keys replaced by the mean of its real tokens, and
the softmax attention of pooled queries over pooled keys (FlexPrefill's query-aware estimate,
MInference's block-sparse estimate).

Cost per query head: `2·R·C·D` FLOPs and `R × C` floats (blocks, never tokens). GQA: pooled query
heads of a KV group are stacked against their one pooled KV head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnpatch.estimators.keys import real_keys
from attnpatch.sparsity import KeyBounds, num_blocks
from attnpatch.sparsity.regions import allowed_blocks


def pool_blocks(x: torch.Tensor, block: int, real: torch.Tensor | None = None) -> torch.Tensor:
    """`[B, H, N, D]` float32: mean of each block of `x [B, H, L, D]` over its real tokens (`real [B, L]`
    bool, None: all; a ragged last block is averaged over the tokens it has). A block without a real
    token is 0. Sums accumulate in float32 from the input's dtype (a copy of `x` only to zero padding)."""
    b, h, length, d = x.shape
    n = num_blocks(length, block)
    if real is not None:
        x = x.masked_fill(~real.view(b, 1, length, 1), 0)
        count = F.pad(real, (0, n * block - length)).view(b, 1, n, block).sum(-1, dtype=torch.float32)
    else:
        count = torch.full((1, 1, n), float(block), device=x.device)
        count[..., -1] = length - (n - 1) * block
    whole = length // block
    total = x[:, :, :whole * block].view(b, h, whole, block, d).sum(3, dtype=torch.float32)
    if whole < n:  # the ragged last block
        total = torch.cat([total, x[:, :, whole * block:].sum(2, keepdim=True, dtype=torch.float32)], dim=2)
    return total / count.unsqueeze(-1).clamp(min=1)


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
