"""`recycled`: Recycled Attention / RefreshKV (arXiv 2411.05787) — full attention every `stride`
steps, in between only the pages that step found most attended plus what was generated since."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from attnpatch.cache import RecycledLayer, RecycledState
from attnpatch.methods.base import DecodeContext, DecodeMethod
from attnpatch.methods.decode.pages import check_budget, compact, top_pages, topk_option, visible_keys
from attnpatch.options import option
from attnpatch.registry import register_decode
from attnpatch.sparsity import PageSelection, num_blocks


def page_mass(query: torch.Tensor, key: torch.Tensor, visible: torch.Tensor, scale: float,
              page_size: int) -> torch.Tensor:
    """Attention mass per page of one decode query, summed over each KV head's query heads:
    query `[B, Hq, 1, D]`, key `[B, Hkv, L, D]`, visible `[B, L]` -> `[B, Hkv, pages]` (float32).
    The probabilities are `[B, Hq, L]` (one query row; never L × L)."""
    b, hq, _, d = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    q = query.reshape(b, hkv, hq // hkv, d)
    scores = (q @ key.transpose(-1, -2)).float() * scale  # [B, Hkv, G, L]
    probs = torch.softmax(scores.masked_fill(~visible.view(b, 1, 1, lk), float("-inf")), -1).sum(2)
    n = num_blocks(lk, page_size)
    return torch.nn.functional.pad(probs, (0, n * page_size - lk)).view(b, hkv, n, page_size).sum(-1)


@register_decode("recycled")
@dataclass
class Recycled(DecodeMethod):
    """Every `stride` steps full attention, which picks the `budget / page_size` most attended pages;
    the steps in between read only those pages and the pages of tokens generated since.

    Per layer: a refresh step (the first decode step, then every `stride` steps, and whenever the
    cache grew by more than one token since the last step, e.g. a new prompt chunk) runs dense
    attention and computes the same step's probabilities once more (`[B, Hq, L]`, one extra q·Kᵀ
    GEMV; never L × L) to rank the pages. The steps after it read the recycled pages ∪ the pages
    holding tokens generated since that refresh.

    Choices: page granularity (pages of `page_size`, 16 by default — the smallest page of the split-KV
    Triton decode kernel, which then runs every recycled step; token granularity would need a
    gathered K/V copy per refresh), a page ranked by the attention mass of its tokens; GQA — one
    page list per KV head, the group's query heads' probabilities summed (§0.3 option 2); always
    kept: the row's first real token's page (sinks; each row's own under left padding) and the page of
    the refresh's query (local context). The refresh schedule is decided on the host (a per-layer
    step counter in the cache layer). Sliding-window layers run their window; caches shorter than
    `min_length` run dense. That host schedule (measured: a `torch.compile(fullgraph=True)` step hit the
    recompile limit at 32K, batch 4, H100) is why a compiled step refuses the method
    (`compiled_step_reason`); a device-side schedule (fixed-width recent pages, the refresh decided on the
    GPU) would lift it.
    """

    full_density: ClassVar[dict] = {"budget": 1 << 30}
    compiled_step_reason: ClassVar[str | None] = (
        "recycled decides its refresh schedule on the host (a per-layer step counter and the cache length as "
        "Python ints, and as many recent pages as tokens generated since the refresh), so a compiled step "
        "would recompile at every token; run its decode steps eager")

    budget: int = option(1024, "keys recycled per KV head at a refresh (a multiple of page_size, >= 3 pages)",
                         min=48, max=1 << 30)
    stride: int = option(16, "decode steps from one full-attention refresh to the next (1: every step)", min=1)
    page_size: int = option(16, "tokens per recycled page", choices=(16, 32, 64, 128))
    topk: str = topk_option()
    min_length: int = option(0, "caches shorter than this run dense", min=0)

    def __post_init__(self) -> None:
        check_budget("recycled", self.budget, self.page_size)

    def cache_layer(self, layer_idx: int, config: Any) -> RecycledLayer:
        return RecycledLayer(self.page_size)

    def select(self, query: torch.Tensor, key: torch.Tensor, ctx: DecodeContext) -> PageSelection | None:
        state = ctx.cache_layer
        lk = key.shape[2]
        if ctx.sliding_window is not None or not isinstance(state, RecycledState) or state.page_size != self.page_size:
            return None
        length = state.length
        if length < self.min_length:
            return None
        steps = state.steps_since_refresh + 1
        if state.pages is None or steps >= self.stride or length != state.refresh_length + steps:
            self._refresh(query, key, ctx, state, length)
            return None
        state.steps_since_refresh = steps
        return self._recycled_pages(state, length, lk, query.device)

    def _refresh(self, query, key, ctx: DecodeContext, state: RecycledState, length: int) -> None:
        b, ps, lk = query.shape[0], self.page_size, key.shape[2]
        visible = visible_keys(ctx.bounds, b, lk, query.device)
        mass = page_mass(query, key, visible, ctx.scale, ps)
        n = mass.shape[-1]
        pages = torch.arange(n, device=query.device)
        seen = torch.nn.functional.pad(visible, (0, n * ps - lk)).view(b, n, ps).any(-1)  # [B, n]
        first = ctx.bounds.first_key(b, query.device) // ps
        forced = (pages.view(1, n) == first.view(b, 1)) | (pages == (length - 1) // ps)
        sel = top_pages(mass, min(self.budget // ps, n), seen.unsqueeze(1), forced.unsqueeze(1), lk, ps, self.topk)
        state.record_refresh(sel.indices.long(), sel.counts, length)

    def _recycled_pages(self, state: RecycledState, length: int, lk: int, device) -> PageSelection:
        ps = self.page_size
        kept = state.pages
        b, hkv, width = kept.shape
        listed = torch.arange(width, device=device) < state.counts.unsqueeze(-1)
        recent = torch.arange(state.refresh_length // ps, (length - 1) // ps + 1, device=device)
        candidates = torch.cat([kept, recent.expand(b, hkv, -1)], -1)
        ok = torch.cat([listed, torch.ones(b, hkv, recent.numel(), dtype=torch.bool, device=device)], -1)
        return compact(candidates, ok, num_blocks(lk, ps), lk, ps)
