"""Vertical (column) and slash (diagonal) sets as block masks, for queries aligned to the end of the keys.

* `column_blocks`: a key block is kept (for every query block) when it holds a selected column;
* `diagonal_blocks`: exact conversion of token diagonals — a (query block, key block) pair is kept
  when some query of the block and some key of the block lie on a selected diagonal (a 64-query
  block meets one diagonal in at most two key blocks), so the block mask is a superset of the
  token pattern;
* `block_diagonals`: FlexPrefill's block-level slashes — block-diagonal `d` keeps, in every query
  block, the key block `d` blocks left of the one holding its last query.

All outputs are `[B, H, R, C]` or `[B, H, C]` booleans over blocks; temporaries are chunked over
query blocks (never tokens × tokens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnpatch.sparsity import num_blocks
from attnpatch.sparsity.regions import query_block_span

CHUNK_ELEMS = 1 << 25  # (query block, key block) pairs per chunk in `diagonal_blocks`


def column_blocks(columns: torch.Tensor, block: int) -> torch.Tensor:
    """`[B, H, C]` bool: key blocks holding at least one selected column (`columns [B, H, Lk]` bool)."""
    b, h, lk = columns.shape
    c = num_blocks(lk, block)
    return F.pad(columns, (0, c * block - lk)).view(b, h, c, block).any(-1)


def diagonal_blocks(diagonals: torch.Tensor, q_len: int, block: int, chunk_elems: int = CHUNK_ELEMS
                    ) -> torch.Tensor:
    """`[B, H, R, C]` bool: block pairs holding a (query, key) pair on a selected diagonal.

    `diagonals [B, H, Lk]` bool, indexed by the offset `query position - key position`. Pair (r, c)
    meets offsets `[first_q(r) - last_k(c), last_q(r) - first_k(c)]`; a prefix count of the selected
    offsets answers each pair with two lookups.
    """
    b, h, lk = diagonals.shape
    rows, cols = num_blocks(q_len, block), num_blocks(lk, block)
    device = diagonals.device
    count = F.pad(diagonals.to(torch.int32).cumsum(-1, dtype=torch.int32), (1, 0))  # [B, H, Lk + 1]
    first_q, last_q = query_block_span(q_len, lk, block, device)
    c = torch.arange(cols, device=device)
    first_k, last_k = c * block, torch.clamp((c + 1) * block, max=lk) - 1
    out = torch.empty(b, h, rows, cols, dtype=torch.bool, device=device)
    step = max(1, chunk_elems // max(1, b * h * cols))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        lo = (first_q[r0:r1].view(-1, 1) - last_k.view(1, -1)).clamp(0, lk)
        hi = (last_q[r0:r1].view(-1, 1) - first_k.view(1, -1) + 1).clamp(0, lk)  # exclusive
        out[:, :, r0:r1] = (count[..., hi] - count[..., lo]) > 0
    return out


def block_diagonals(selected: torch.Tensor, q_len: int, kv_len: int, block: int) -> torch.Tensor:
    """`[B, H, R, C]` bool: pair (r, c) kept when block-diagonal `d = diag(r) - c` is selected, where
    `diag(r)` is the key block of query block r's last query (`selected [B, H, C]`, index d)."""
    b, h, cols = selected.shape
    device = selected.device
    _, last_q = query_block_span(q_len, kv_len, block, device)
    d = (last_q // block).view(-1, 1) - torch.arange(cols, device=device).view(1, -1)  # [R, C]
    return selected[..., d.clamp(0, cols - 1)] & (d >= 0)


def block_sums(x: torch.Tensor, block: int) -> torch.Tensor:
    """`[B, H, N]`: `x [B, H, L]` summed over runs of `block` entries (a ragged last run is summed as is)."""
    b, h, length = x.shape
    n = num_blocks(length, block)
    return F.pad(x, (0, n * block - length)).view(b, h, n, block).sum(-1)


def top_per_head(scores: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """`[B, H, N]` bool: the `k[b, h]` highest entries of `scores [B, H, N]` (`k` broadcastable to
    `[B, H]`; ties broken towards the lower index)."""
    order = scores.argsort(dim=-1, descending=True, stable=True)
    ranked = torch.arange(scores.shape[-1], device=scores.device) < k.unsqueeze(-1)
    return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter(-1, order, ranked.expand_as(order))
