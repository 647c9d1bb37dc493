"""The float32 reference of per-page log-sum-exp: for one decode query and every page `p`,
`log Σ_{j∈p, visible} exp(σ·q·k_j)` per query head — what a Recycled refresh ranks pages by. The Triton
decode kernel writes the same for the pages it reads (`sparse_decode_attention(..., page_lse=)`), the fused
estimator `attnpatch.estimators.page_lse` for every page."""

from __future__ import annotations

import torch

from attnpatch.sparsity import PageSelection, num_blocks

__all__ = ["listed_page_lse", "page_lse_torch"]


def page_lse_torch(query: torch.Tensor, key: torch.Tensor, page_size: int, scale: float,
                   visible: torch.Tensor | None = None) -> torch.Tensor:
    """Query `[B, Hq, 1, D]`, key `[B, Hkv, L, D]`, `visible` `[B, L]` bool (None: every key) ->
    `[B, Hkv, G, ceil(L / page_size)]`. Builds the `[B, Hq, L]` scores (one query row)."""
    b, hq, _, d = query.shape
    hkv, length = key.shape[1], key.shape[2]
    q = query.reshape(b, hkv, hq // hkv, d).float()
    scores = (q @ key.float().transpose(-1, -2)) * scale  # [B, Hkv, G, L]
    if visible is not None:
        scores = scores.masked_fill(~visible.view(b, 1, 1, length), float("-inf"))
    n = num_blocks(length, page_size)
    scores = torch.nn.functional.pad(scores, (0, n * page_size - length), value=float("-inf"))
    return torch.logsumexp(scores.view(b, hkv, hq // hkv, n, page_size), -1)


def listed_page_lse(query: torch.Tensor, key: torch.Tensor, selection: PageSelection, scale: float,
                    visible: torch.Tensor | None = None) -> torch.Tensor:
    """`[B, Hq, n]` float32: `page_lse_torch` on the pages each KV head's list holds, -inf on the others (what
    the decode kernel writes into a buffer of -inf)."""
    b, hq = query.shape[0], query.shape[1]
    hkv = key.shape[1]
    lse = page_lse_torch(query, key, selection.page_size, scale, visible)  # [B, Hkv, G, n]
    n = lse.shape[-1]
    idx = selection.indices.to(device=query.device, dtype=torch.long)
    listed = torch.arange(idx.shape[-1], device=query.device) < selection.counts.to(query.device).unsqueeze(-1)
    keep = (listed & (idx >= 0) & (idx < n)).to(torch.int32)  # entries past the cache are never read
    held = torch.zeros(b, hkv, n, dtype=torch.int32, device=query.device).scatter_add_(-1, idx.clamp(0, n - 1), keep)
    return lse.masked_fill(held.unsqueeze(2) == 0, float("-inf")).reshape(b, hq, n)
