"""Token-level attention-mass estimate: per query block, the mean over its pooled sub-blocks of the
softmax of the pooled scores — the share of the block's attention each key is estimated to take.

For sub-block `b` (`pool` consecutive query rows, real rows only) with pooled query q̄_b, the estimate is
`p̂_bj = softmax_j(σ · q̄_b · k_j)` over the keys the sub-block's last row may see (causal, padding,
window); a key's importance for the block is `I_j = mean_b p̂_bj` over the sub-blocks that have a real
row, so `Σ_j I_j = 1` (0 for a block made of padding only). Temporaries O(blocks · Bq/pool · keys).
"""

from __future__ import annotations

import torch

from attnpatch.estimators.pooled import pooled_scores
from attnpatch.sparsity import KeyBounds
from attnpatch.sparsity.tokens import closed_bounds


def block_token_mass(qbar: torch.Tensor, rows: torch.Tensor, key: torch.Tensor, scale: float, sub_last: torch.Tensor,
                     sub_blocks: int, bounds: KeyBounds, keys: int) -> torch.Tensor:
    """`I [B, Hq, n, keys]` float32 for `n` query blocks of `sub_blocks` pooled sub-blocks each.

    `qbar [B, Hq, n · sub_blocks, D]` pooled queries, `rows [B, 1, n · sub_blocks]` the real rows behind
    each, `sub_last [n · sub_blocks]` the absolute position of each sub-block's last query (what it may
    see), `keys` how many leading keys to score (at least every key the blocks may see)."""
    b, hq, nm, _ = qbar.shape
    n = nm // sub_blocks
    kpos = torch.arange(keys, device=key.device).view(1, 1, 1, -1)
    vis = closed_bounds(bounds, b, key.device).visible(sub_last.view(1, 1, -1, 1), kpos, b)  # [B|1, 1, nm, keys]
    s = pooled_scores(qbar, key, scale, keys).masked_fill_(~vis, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num_(0.0)  # a sub-block that sees no key contributes nothing
    live = ((rows > 0) & vis.any(-1)).to(p.dtype)  # [B, 1, nm]
    p.mul_(live.unsqueeze(-1))
    share = live.view(live.shape[0], 1, n, sub_blocks).sum(-1).clamp(min=1)  # [B, 1, n]
    return p.view(b, hq, n, sub_blocks, keys).sum(3) / share.unsqueeze(-1)
