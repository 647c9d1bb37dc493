"""`a_shape`: attention sinks + a local window, as a block selection (the standard prefill baseline)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnpatch.methods.base import DenseFallback, PrefillContext, PrefillMethod
from attnpatch.registry import option, register_method
from attnpatch.sparsity import BlockSelection, num_blocks


@register_method("a_shape", "prefill")
@dataclass
class AShape(PrefillMethod):
    """Sink blocks + local blocks up to the diagonal (StreamingLLM's A-shape pattern as block sparsity).

    Choices: the sink is `sink_blocks * block_size` tokens from each row's first non-padding token
    (so left-padded rows keep their real sink, not padding); the local window is the `local_blocks`
    key blocks ending at the block that holds the query block's last token, widened to also cover
    the block of its first token when a chunked-prefill offset misaligns them. Same selection for
    every head.
    """

    block_size: int = option(64, "query and key block size in tokens", choices=(16, 32, 64, 128))
    sink_blocks: int = option(1, "key blocks kept from the start of each sequence", min=0)
    local_blocks: int = option(8, "key blocks kept up to and including the diagonal block", min=1)

    def select(self, query: torch.Tensor, key: torch.Tensor, ctx: PrefillContext) -> BlockSelection | DenseFallback:
        b, h, lq, _ = query.shape
        lk = key.shape[2]
        bs = self.block_size
        n_qb, n_kb = num_blocks(lq, bs), num_blocks(lk, bs)
        if n_kb <= self.sink_blocks + self.local_blocks:
            return DenseFallback(f"input of {lk} keys fits in sink+local ({self.sink_blocks}+{self.local_blocks} blocks)")
        device = query.device
        offset = lk - lq
        r = torch.arange(n_qb, device=device)
        first_q = offset + r * bs
        last_q = offset + torch.clamp((r + 1) * bs, max=lq) - 1
        hi = (last_q // bs).view(1, n_qb, 1)
        lo = (first_q // bs - (self.local_blocks - 1)).clamp(min=0).view(1, n_qb, 1)
        start = ctx.key_start if ctx.key_start is not None else torch.zeros(b, dtype=torch.long, device=device)
        sink_lo = (start // bs).view(b, 1, 1)
        sink_hi = ((start + self.sink_blocks * bs - 1) // bs).view(b, 1, 1)
        c = torch.arange(n_kb, device=device).view(1, 1, n_kb)
        local = (c >= lo) & (c <= hi)
        sink = (c >= sink_lo) & (c <= sink_hi) & (self.sink_blocks > 0)
        mask = (local | sink) & (c <= hi)  # [B, R, C]
        sel = BlockSelection.from_block_mask(mask.unsqueeze(1), bs, bs, lq, lk)
        return BlockSelection(
            sel.indices.expand(b, h, -1, -1), sel.counts.expand(b, h, -1), bs, bs, lq, lk
        )
