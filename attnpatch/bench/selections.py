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


def bernoulli_block_selection(batch: int, heads: int, q_len: int, length: int, block_q: int, block_k: int,
                              density: float, seed: int, shared: bool = False, keep_first: bool = False,
                              device=None) -> BlockSelection:
    """Each causally valid block kept with probability `density`, plus the diagonal (and block 0 with
    `keep_first`); query block 1 of row 0, head 0 keeps nothing (a row that sees no key). `shared`: one
    selection expanded over the heads (a KV group's shared list)."""
    g = torch.Generator(device=device).manual_seed(seed)
    r, c = num_blocks(q_len, block_q), num_blocks(length, block_k)
    limit = causal_block_limit(q_len, length, block_q, block_k, device).view(1, 1, r, 1)
    col = torch.arange(c, device=device)
    forced = (col == limit - 1) | ((col == 0) if keep_first else False)
    keep = (torch.rand(batch, 1 if shared else heads, r, c, device=device, generator=g) < density) | forced
    keep &= col < limit
    keep[0, 0, min(1, r - 1)] = False
    sel = BlockSelection.from_block_mask(keep, block_q, block_k, q_len, length)
    if shared:
        sel = BlockSelection(sel.indices.expand(batch, heads, -1, -1), sel.counts.expand(batch, heads, -1),
                             block_q, block_k, q_len, length)
    return sel


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
