"""`blasst`: skip key tiles whose scores are negligible against the running max (arXiv 2512.12087)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from attnpatch.methods.base import DecodeContext, DecodeMethod, DenseFallback, PrefillContext, PrefillMethod
from attnpatch.registry import option, register_method
from attnpatch.sparsity import BlockSelection, PageSelection, SkipRule, causal_block_limit, num_blocks


@register_method("blasst", ("prefill", "decode"))
@dataclass
class Blasst(PrefillMethod, DecodeMethod):
    """Skip a key tile when every row's tile max is below its running max + ln λ, with λ = a / L.

    Choices (methods.md §1): L is the full KV length of the call (as FlashInfer/TRT-LLM), and λ is
    capped at 1. `convention="scaled"` compares scaled scores σ·q·k (λ then bounds the ratio of a
    skipped probability to the row's running max probability); `"raw"` compares raw q·k, which
    NVIDIA's published factors assume — their `a` values are not transferable between the two.
    Tiles are visited left to right so the sink tile sets the running max first. Prefill decides
    per (query head, query block); decode per KV head, all G query heads of the group agreeing
    (one V load per page), pages in order without splits in the reference.

    Default `a = 128` (scaled): on SmolLM2-135M it skips 25 % of the prefill tiles at 4K and 30 %
    at 8K for +0.13 % perplexity on Pride and Prejudice and unchanged passkey accuracy; a = 1024
    skips 43–45 % for +0.6 % (bench/results/blasst_smollm2.md). Default `decode_a = 1` skips 31 % of
    the decode pages at 4K with unchanged passkey answers; 16 skips 62 %, 256 skips 78 %, also
    unchanged on those 3 prompts (bench/results/blasst_smollm2_decode.md) — kept conservative.
    """

    a: float = option(128.0, "prefill: λ = a / L (L = KV length); 0 disables skipping", min=0.0)
    decode_a: float = option(1.0, "decode: λ = decode_a / L; 0 disables skipping", min=0.0)
    convention: str = option("scaled", "threshold on scaled (σ·q·k) or raw (q·k) scores", choices=("scaled", "raw"))
    block_size: int = option(128, "prefill query/key tile size", choices=(16, 32, 64, 128))
    page_size: int = option(128, "decode key tile size", choices=(16, 32, 64, 128))

    def _rule(self, a: float, kv_len: int, scale: float) -> SkipRule:
        log_lam = min(math.log(a / kv_len), 0.0)
        return SkipRule(log_lam * scale if self.convention == "raw" else log_lam)

    def select(self, query: torch.Tensor, key: torch.Tensor, ctx):
        b, h, lq, _ = query.shape
        lk = key.shape[2]
        if isinstance(ctx, DecodeContext):
            if self.decode_a == 0:
                return None
            return PageSelection.all_pages(b, key.shape[1], lk, self.page_size, query.device,
                                           self._rule(self.decode_a, lk, ctx.scale))
        assert isinstance(ctx, PrefillContext)
        if self.a == 0:
            return DenseFallback("a = 0: no tile can be skipped")
        if lk <= self.block_size:
            return DenseFallback(f"input of {lk} keys fits in one {self.block_size}-key tile")
        rule = self._rule(self.a, lk, ctx.scale)
        bs = self.block_size
        if ctx.sliding_window is None or ctx.sliding_window >= lk:
            return BlockSelection.causal(b, h, lq, lk, bs, bs, query.device, rule)
        # Sliding-window layer: visit only the key blocks that some query of the block can see.
        r, c = num_blocks(lq, bs), num_blocks(lk, bs)
        first_q = (lk - lq) + torch.arange(r, device=query.device) * bs
        lo = ((first_q - ctx.sliding_window + 1).clamp(min=0) // bs).view(r, 1)
        limit = causal_block_limit(lq, lk, bs, bs, query.device).view(r, 1)
        col = torch.arange(c, device=query.device).view(1, c)
        sel = BlockSelection.from_block_mask(((col >= lo) & (col < limit)).view(1, 1, r, c), bs, bs, lq, lk)
        return BlockSelection(sel.indices.expand(b, h, -1, -1), sel.counts.expand(b, h, -1), bs, bs, lq, lk, rule)
