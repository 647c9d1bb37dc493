"""`recycled`: Recycled Attention / RefreshKV (arXiv 2411.05787) — full attention every `stride`
steps, in between only the pages that step found most attended plus what was generated since."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from attnpatch.cache import RecycledLayer, RecycledState, StaticRecycledLayer
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
    `min_length` run dense.

    Compiled steps (`torch.compile` of the model on a static cache): the same schedule decided on the
    device (`compiled_step`). The cache layer keeps the recycled pages, the refresh length and the
    steps since in preallocated tensors; each layer's step is one `torch.cond` on "refresh now" (no
    refresh yet, `stride` steps since, or the cache grew by more than one token), whose branches are
    the dense step plus the page ranking, and the read of the recycled pages plus a fixed number of
    recent pages (`ceil(stride / page_size) + 1`, those past the written length dropped). Host
    counters, which a compiled step would be guarded on (it recompiled at every token, measured at
    32K, batch 4, H100), are not read there. Inductor runs the `cond` outside its CUDA graphs (a
    graph partition per layer, the predicate read on the host): measured on the H200 (32K, batch 4,
    32-layer 8B shape, reduce-overhead) 24.2 ms a token against 10.5 ms for the Triton kernel over every
    page, so a compiled `recycled` step is slower than dense (bench/results/hf_decode_h200/
    recycled_compiled_32k_b4_2026-12-06/).
    `min_length` compares with the static cache's capacity in a compiled step (as `quest`).
    """

    full_density: ClassVar[dict] = {"budget": 1 << 30}

    budget: int = option(1024, "keys recycled per KV head at a refresh (a multiple of page_size, >= 3 pages)",
                         min=48, max=1 << 30)
    stride: int = option(16, "decode steps from one full-attention refresh to the next (1: every step)", min=1)
    page_size: int = option(16, "tokens per recycled page", choices=(16, 32, 64, 128))
    topk: str = topk_option()
    min_length: int = option(0, "caches shorter than this run dense", min=0)

    def __post_init__(self) -> None:
        check_budget("recycled", self.budget, self.page_size)

    def cache_layer(self, layer_idx: int, config: Any) -> RecycledLayer:
        return RecycledLayer(self.page_size, self.budget // self.page_size)

    def select(self, query: torch.Tensor, key: torch.Tensor, ctx: DecodeContext) -> PageSelection | None:
        state = ctx.cache_layer
        lk = key.shape[2]
        if ctx.sliding_window is not None or not isinstance(state, RecycledState) or state.page_size != self.page_size:
            return None
        if isinstance(state, StaticRecycledLayer) and state.host_stale:  # compiled steps ran since
            state.resync_host()
        length = state.length
        if length < self.min_length:
            return None
        steps = state.steps_since_refresh + 1
        if state.pages is None or steps >= self.stride or length != state.refresh_length + steps:
            self._refresh(query, key, ctx, state, length)
            return None
        state.steps_since_refresh = steps
        return self._recycled_pages(state.pages, state.counts, state.refresh_length, length, lk)

    def _refresh(self, query, key, ctx: DecodeContext, state: RecycledState, length: int) -> None:
        sel = self._ranked_pages(query, key, ctx, length)
        state.record_refresh(sel.indices.long(), sel.counts, length)

    def compiled_step(self, query: torch.Tensor, key: torch.Tensor, ctx: DecodeContext, attend) -> torch.Tensor:
        """The schedule of `select` decided on the device (see the class docstring): one `torch.cond`."""
        state = ctx.cache_layer
        lk = key.shape[2]
        if ctx.sliding_window is not None or lk < self.min_length:
            return attend(None)
        if not isinstance(state, StaticRecycledLayer) or state.device_schedule is None \
                or state.page_size != self.page_size:
            raise RuntimeError("recycled's compiled decode step keeps its schedule in a static cache's layers: "
                               "generate with cache_implementation='static' (or a StaticCache) under the patch")
        state.host_stale = True  # eager steps after these resume from the cache's written length
        schedule = state.device_schedule
        written = state.cumulative_length.reshape(()).to(torch.long)
        steps = schedule.steps + 1
        refresh_now = (schedule.refresh_at == 0) | (steps >= self.stride) | (written != schedule.refresh_at + steps)

        def refresh(pages, counts, refresh_at, steps):  # query, key (and attend's tensors) are closed over
            # every page on the decode backend (the best dense decode): SDPA would also close over the
            # attention mask, which aliases the key bounds, and a cond branch's inputs must not alias
            out = attend(PageSelection.all_pages(query.shape[0], key.shape[1], lk, self.page_size, query.device))
            sel = self._ranked_pages(query, key, ctx, written)
            return (out.contiguous(), sel.indices.to(pages.dtype), sel.counts.to(counts.dtype), written.clone(),
                    torch.zeros_like(steps))

        def recycle(pages, counts, refresh_at, steps):
            sel = self._recycled_pages(pages, counts, refresh_at, written, lk)
            return attend(sel).contiguous(), pages.clone(), counts.clone(), refresh_at.clone(), steps + 1

        out, pages, counts, refresh_at, steps = torch.cond(
            refresh_now, refresh, recycle, (schedule.pages, schedule.counts, schedule.refresh_at, schedule.steps))
        schedule.pages.copy_(pages)
        schedule.counts.copy_(counts)
        schedule.refresh_at.copy_(refresh_at)
        schedule.steps.copy_(steps)
        return out

    def _ranked_pages(self, query, key, ctx: DecodeContext, written: int | torch.Tensor) -> PageSelection:
        """A refresh's page list: the `budget / page_size` pages of most attention mass among the visible
        ones, the sink page and the current one (`written - 1`: a host int or a device tensor) forced in."""
        b, ps, lk = query.shape[0], self.page_size, key.shape[2]
        visible = visible_keys(ctx.bounds, b, lk, query.device)
        mass = page_mass(query, key, visible, ctx.scale, ps)
        n = mass.shape[-1]
        pages = torch.arange(n, device=query.device)
        seen = torch.nn.functional.pad(visible, (0, n * ps - lk)).view(b, n, ps).any(-1)
        first = ctx.bounds.first_key(b, query.device) // ps
        forced = (pages.view(1, n) == first.view(b, 1)) | (pages == (written - 1) // ps)
        return top_pages(mass, min(self.budget // ps, n), seen.unsqueeze(1), forced.unsqueeze(1), lk, ps, self.topk)

    def _recycled_pages(self, pages, counts, refresh_at: int | torch.Tensor, written: int | torch.Tensor,
                        lk: int) -> PageSelection:
        """The recycled pages ∪ the pages written since the refresh (`refresh_at`, `written`: host ints in an
        eager step, device tensors in a compiled one), a fixed width: `ceil(stride / page_size) + 1` recent
        pages, those past the written length dropped."""
        ps = self.page_size
        n = num_blocks(lk, ps)
        b, hkv, width = pages.shape
        device = pages.device
        recent_width = min(n, -(-self.stride // ps) + 1)
        recent = refresh_at // ps + torch.arange(recent_width, device=device)
        listed = torch.arange(width, device=device) < counts.unsqueeze(-1)
        fresh = (recent <= (written - 1) // ps).expand(b, hkv, recent_width)
        candidates = torch.cat([pages.long(), recent.clamp(max=n - 1).expand(b, hkv, recent_width)], -1)
        return compact(candidates, torch.cat([listed, fresh], -1), n, lk, ps)
