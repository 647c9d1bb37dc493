"""Exact attention of the last `n` queries over every key, and its column (vertical) and diagonal
(slash) sums: the probe of MInference's vertical-slash pattern and of FlexPrefill.

Cost per query head: `2·n·Lk·D` FLOPs and an `n × Lk` float32 temporary (O(n·L), never L×L). GQA:
the query heads of a KV group are stacked against their one KV head (K is never repeated).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnpatch.sparsity import KeyBounds


def _visible(bounds: KeyBounds, batch: int, n: int, q_len: int, kv_len: int, device) -> torch.Tensor:
    """`[B|1, 1|H, n, Lk]` bool: which keys each of the last `n` queries may see (causal, padding,
    window; a tensor mask is read for those rows only)."""
    qpos = torch.arange(kv_len - n, kv_len, device=device).view(1, 1, n, 1)
    kpos = torch.arange(kv_len, device=device).view(1, 1, 1, kv_len)
    if bounds.mask is not None:
        return bounds.mask[:, :, q_len - n:, :].to(device) & (kpos <= qpos)
    return bounds.visible(qpos, kpos, batch)


def last_query_attention(query: torch.Tensor, key: torch.Tensor, scale: float, bounds: KeyBounds,
                         n: int) -> torch.Tensor:
    """`[B, Hq, n', Lk]` float32: causal softmax attention of the last `n' = min(n, Lq)` queries over
    all keys (query `i` sits at position `Lk - n' + i`). Padding keys get probability 0; a row that
    sees no key is all zeros.

    query `[B, Hq, Lq, D]`, key `[B, Hkv, Lk, D]` (Hq a multiple of Hkv).
    """
    b, hq, lq, d = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    n = min(n, lq)
    q = query[:, :, lq - n:].reshape(b, hkv, (hq // hkv) * n, d)  # a KV group's query heads, stacked
    logits = torch.matmul(q, key.transpose(-1, -2)).view(b, hq, n, lk).float() * scale
    logits.masked_fill_(~_visible(bounds, b, n, lq, lk, query.device), float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num_(0.0)


def column_sums(probs: torch.Tensor) -> torch.Tensor:
    """`[B, H, Lk]`: each key's attention summed over the queries (the vertical score)."""
    return probs.sum(-2)


def diagonal_sums(probs: torch.Tensor) -> torch.Tensor:
    """`[B, H, Lk]`: attention summed along each diagonal (the slash score), indexed by the offset
    `o = query position - key position` (0 = the main diagonal), for queries aligned to the end of
    the keys. Offsets no query reaches sum to 0.

    A strided view of a left-padded copy lines the diagonals up as columns (memory: one copy of
    `probs`)."""
    b, h, n, lk = probs.shape
    padded = F.pad(probs, (n, 0)).contiguous()  # padded[i, n + j] = probs[i, j]
    # Query i sits at position lk - n + i; for v = lk - 1 - o its key is lk - n + i - o = v + 1 + i - n,
    # i.e. padded[i, v + 1 + i]: a stride of (lk + n + 1) per query row lines the diagonal up in column v.
    w = lk + n
    lined = padded.as_strided((b, h, n, lk), (h * n * w, n * w, w + 1, 1), storage_offset=1)
    return lined.sum(-2).flip(-1)
