"""`quest`: query-aware page selection from per-page key min / max (Quest, arXiv 2406.10774)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from attnpatch.cache import PageBoundsLayer, key_page_bounds
from attnpatch.estimators.page_bounds import page_upper_bounds
from attnpatch.methods.base import Attend, DecodeContext, DecodeMethod
from attnpatch.methods.decode.pages import check_budget, group_top_pages, top_pages, topk_option
from attnpatch.options import option
from attnpatch.registry import register_decode
from attnpatch.sparsity import BoundPages, PageSelection, num_blocks


@register_decode("quest")
@dataclass
class Quest(DecodeMethod):
    """Read the `budget / page_size` pages with the largest upper bound of q·k (from each page's key min / max).

    Per step and layer: the bound `Σ_d max(q_d·min_d, q_d·max_d)` of every page (the cache layer
    keeps the min / max, updated incrementally; computed by a fused Triton kernel on the GPU, float32
    accumulation: `attnpatch.estimators.page_bounds`), the top pages per KV head, with the row's first page
    (attention sinks: its first real token's page under left padding) and the current (last) page
    always kept. The selection is a fixed-size PageSelection built by tensor ops (topk, no host sync,
    with a static cache too, so it can be captured in a CUDA graph).

    Choices: GQA — one page list per KV head, so a step reads `budget` keys per KV head whatever the
    group size; the group's query heads combine by `group` = "mass" (default: each head's bounds,
    scaled, softmaxed over the pages and summed over the group, so every head's likely pages count
    in proportion) or "max" (the group's largest bound: a page is kept when any head's bound is
    high). On SmolLM2 at 4K (3 passkey prompts, budget 256 = 1/16 of the keys; CPU run in
    bench/results/decode_smollm2/) "mass" answered 3/3 (KL to dense decoding 0.36, top-1 agreement
    0.85) where "max" answered 2/3 (KL 0.42, agreement 0.79), lower KL on every prompt; at 8K over 20
    passkey prompts (budget 512 = 1/16, no dense layers) both answer as dense (0.75), KL 0.025 ("mass")
    vs 0.034, recall 0.913 vs 0.907 (bench/results/decode_smollm2/decode_fidelity_passkey_8k_pages_cpu_n20.md).
    Forcing 1–3 local pages before the current one did not lower the KL (one 2K prompt, budget 128;
    `local_pages`, default 0). Page size: 64, not the paper's 16. At 16 on SmolLM2 4K it cuts needle
    numbers short (niah_single_1 0.60 at budget 1024 over 20 samples, dense 1.00; on 8 prompts 4/8 at
    page 16, 8/8 at page 64 with the same budget: bench/results/decode_smollm2/quest_page_size_niah.md)
    — the page holding the rest of the number is not chosen; at 128 (8K, the 20 passkey prompts above) it
    answers as dense too, with recall 0.896 and KL 0.042 against page 64's 0.913 / 0.025 (and niah_single_1
    1.00 like dense over lm-eval's first 20 prompts at 8K, budget 512), and halves the
    tables a step reads: the compiled 128K batch-4 step below takes 7.66 ms at page 128 against 7.98 at 64
    without dense layers (H200, same run: bench/results/hf_decode_h200/pages128_2026-12-05/);
    budget 1024 at page 64 scores passkey 0.95,
    niah_single_1 1.00 over 20 samples (dense 1.00 / 1.00). At 1/16 of the cache, page 64: niah_single_1
    0.94 at 4K (budget 256: two free pages beside the sink and current ones; 50 samples) and 1.00 at 8K
    (budget 512, also 1.00 at 256; lm-eval's first 25 prompts; dense 1.00 both:
    bench/results/decode_smollm2/decode_fidelity_niah_single_1_cpu_n25.md). The 4K misses are needle
    numbers cut by a page boundary; ranking each page by max(U_p, U_{p-1}) so a chosen page's successor
    comes with it answered 5 of 8 other prompts (seed 1) where this selection answered 8: with two free
    pages it leaves one distinct choice. Not kept. It is also the fastest: a compiled 128K
    step at batch 4 (8B shape, budget 8192) takes 10.3 ms at page 64, 11.8 at 32, 13.0 at 16 on the
    H200 (fewer pages to bound and rank: bench/results/hf_decode_h200/quest_pages_2026-12-04/). Top-k:
    the Triton kernel by default (`topk="triton"`: one launch combines the group's bounds, masks the
    pages and selects and orders them: 9.1 ms for that step at page 64, against 10.3 with torch.topk;
    bench/results/hf_decode_h200/fused_select_2026-12-04/; the torch path where it declines, e.g. on
    CPU). As Quest's code, the first `dense_layers` layers run dense, counted by layer index: on Gemma 3 the first
    five layers are sliding-window layers, which read their window anyway, so every full-attention layer is sparse
    there (without dense layers: 8.1 ms for that step,
    and the same passkey / niah_single_1 scores on SmolLM2 4K at budgets 256 and 1024 — not measured on
    a 7B model, so the paper's 2 stay the default; on held-out niah_single_1 prompts at 1/16, over 64 forced
    steps, `dense_layers=0` answers as the defaults do: 0.96 at 8K, also at 128-token pages, dense 0.94; 0.98 at
    4K, dense 1.00 — bench/results/decode_smollm2/*_forced64_cpu_n50.md); a cache that fits the budget, or is
    shorter than `min_length`, runs dense. With a static cache, `min_length` and the
    fits-the-budget test compare with the cache capacity (host-known, no sync); pages past the
    written length are never selected. Sliding-window layers run their window. A compiled step hands the
    selection to the decode backend as a `BoundPages` description (`compiled_step`), so that a backend able
    to do so bounds, selects and attends in one launch (Triton: `backends/triton/bound_decode.py`, 27.0 against
    30.0 µs a layer at 128K, batch 1, H200; by default up to 8 batch × KV head rows,
    `ATTNPATCH_BOUND_DECODE_CONFIG=off` / `on` never / always); otherwise the step is `select`'s. The cache
    layer holds the kernel's barrier counters (`counters`), made with the page tables, outside any CUDA-graph
    pool.
    """

    full_density: ClassVar[dict] = {"budget": 1 << 30}

    budget: int = option(1024, "keys read per KV head and step (a multiple of page_size, >= 3 pages)",
                         min=48, max=1 << 30)
    page_size: int = option(64, "tokens per page (one min / max per page and channel)", choices=(16, 32, 64, 128))
    group: str = option("mass", "how a KV group's query heads combine their page bounds", choices=("mass", "max"))
    local_pages: int = option(0, "pages before the current one always kept (local context)", min=0)
    topk: str = topk_option("triton")
    dense_layers: int = option(2, "the first layers run dense (as Quest's code)", min=0)
    min_length: int = option(0, "caches shorter than this run dense", min=0)

    def __post_init__(self) -> None:
        check_budget("quest", self.budget, self.page_size, self.local_pages)

    def cache_layer(self, layer_idx: int, config: Any) -> PageBoundsLayer:
        return PageBoundsLayer(self.page_size)

    def _reads_all(self, key: torch.Tensor, ctx: DecodeContext) -> bool:
        """Whether the step reads every key (a window layer, a dense layer, a cache within the budget)."""
        lk = key.shape[2]
        return (ctx.sliding_window is not None or ctx.layer_idx < self.dense_layers
                or num_blocks(lk, self.page_size) <= self.budget // self.page_size or lk < self.min_length)

    def _tables(self, key: torch.Tensor, ctx: DecodeContext) -> tuple[torch.Tensor, torch.Tensor, Any] | None:
        """The cache layer's `(page_min, page_max, written)`, or None (no cache, or another cache's layer)."""
        found = getattr(ctx.cache_layer, "page_bounds", None)
        return found() if found is not None and getattr(ctx.cache_layer, "page_size", None) == self.page_size else None

    def compiled_step(self, query: torch.Tensor, key: torch.Tensor, ctx: DecodeContext, attend: Attend) -> torch.Tensor:
        """A compiled step hands the selection to the decode backend as a `BoundPages` description, so the
        Triton backend bounds, selects and attends in one launch (`backends/triton/bound_decode.py`); where
        no backend can, the step is `select`'s."""
        bound = getattr(attend, "bound", None)
        tables = None if bound is None or self.topk != "triton" or self._reads_all(key, ctx) else self._tables(key, ctx)
        if tables is not None:
            page_min, page_max, written = tables
            ps, b = self.page_size, query.shape[0]
            end = (torch.as_tensor(written, device=query.device) + ps - 1) // ps
            pages = BoundPages(query, page_min, page_max, num_blocks(key.shape[2], ps), self.budget // ps,
                               ctx.bounds.first_key(b, query.device) // ps, end, self.local_pages,
                               "max" if self.group == "max" else "softmax_sum", ps, key.shape[2], ctx.scale,
                               getattr(ctx.cache_layer, "counters", None))
            out = bound(pages)
            if out is not None:
                return out
        return super().compiled_step(query, key, ctx, attend)

    def select(self, query: torch.Tensor, key: torch.Tensor, ctx: DecodeContext) -> PageSelection | None:
        b, hq, _, _ = query.shape
        lk, ps = key.shape[2], self.page_size
        n, k = num_blocks(lk, ps), self.budget // ps
        if self._reads_all(key, ctx):
            return None
        found = self._tables(key, ctx)
        if found is None:  # no metadata (no cache, or another cache's layer): recompute (O(L·D) per step)
            page_min, page_max, written = *key_page_bounds(key, ps), lk
        else:
            page_min, page_max, written = found
        device = query.device
        written = torch.as_tensor(written, device=device)
        first = ctx.bounds.first_key(b, device) // ps  # [B] page of each row's first real key (sinks)
        bound = page_upper_bounds(query, page_min, page_max, n, ctx.scale)
        if self.topk == "triton":  # masks, group combine and top-k in one launch where the kernel runs
            combine = "max" if self.group == "max" else "softmax_sum"
            end = (written + ps - 1) // ps
            sel = group_top_pages(bound, k, first, end, self.local_pages, combine, lk, ps)
            if sel is not None:
                return replace(sel, within_written=found is not None)
        pages = torch.arange(n, device=device)
        valid = ((pages * ps < written) & (pages.view(1, n) >= first.view(b, 1))).view(b, 1, 1, n)
        last = (written - 1) // ps
        forced = (pages.view(1, n) == first.view(b, 1)) | ((pages <= last) & (pages >= last - self.local_pages))
        bound = bound.masked_fill(~valid, float("-inf"))
        score = bound.amax(2) if self.group == "max" else torch.softmax(bound, -1).sum(2)
        sel = top_pages(score, k, valid.squeeze(2), forced.unsqueeze(1), lk, ps, self.topk)
        return replace(sel, within_written=found is not None)  # pages past the layer's written count: masked
