"""Random block selections of a given density that always keep the sink and the diagonal blocks."""

from __future__ import annotations

import torch

from attnpatch.sparsity import BlockSelection, PageSelection, causal_block_limit, num_blocks


def random_block_selection(batch: int, heads: int, length: int, block: int, density: float,
                           seed: int = 0, device=None, q_len: int | None = None) -> BlockSelection:
    """Per (batch, head, query block) keep block 0, the diagonal, and random others up to `density`
    of the causally valid blocks (at least the two forced ones). `length` keys; `q_len` queries
    aligned to the end of the keys (chunked prefill; default `length`)."""
    lq = length if q_len is None else q_len
    r, c = num_blocks(lq, block), num_blocks(length, block)
    g = torch.Generator(device=device).manual_seed(seed)
    limit = causal_block_limit(lq, length, block, block, device).view(1, 1, r, 1)
    col = torch.arange(c, device=device).view(1, 1, 1, c)
    score = torch.rand(batch, heads, r, c, generator=g, device=device)
    score = torch.where((col == 0) | (col == limit - 1), 2.0, score)
    score = torch.where(col < limit, score, -1.0)
    want = (limit.float() * density).round().clamp(min=2).minimum(limit.float())
    rank = score.argsort(dim=-1, descending=True).argsort(dim=-1)
    keep = rank < want
    return BlockSelection.from_block_mask(keep, block, block, lq, length)


def random_page_selection(batch: int, kv_heads: int, length: int, page: int, fraction: float,
                          seed: int = 0, device=None) -> PageSelection:
    """Per (batch, KV head) the first and last pages plus random others: `fraction` of all pages."""
    n = num_blocks(length, page)
    k = max(2, round(n * fraction))
    g = torch.Generator(device=device).manual_seed(seed)
    score = torch.rand(batch, kv_heads, n, generator=g, device=device)
    score[..., 0] = 2.0
    score[..., -1] = 2.0
    top = score.topk(k, dim=-1).indices.sort(dim=-1).values.to(torch.int32)
    return PageSelection(top, torch.full((batch, kv_heads), k, dtype=torch.int32, device=device), page, length)
