"""`recycled`: Recycled Attention / RefreshKV (arXiv 2411.05787) — full attention every `stride`
steps, in between only the pages that step found most attended plus what was generated since."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from attnpatch.cache import RecycledLayer, RecycledState, StaticRecycledLayer
from attnpatch.estimators.page_lse import page_lse
from attnpatch.methods.base import DecodeContext, DecodeMethod
from attnpatch.methods.decode.pages import (
    check_budget,
    group_top_pages,
    pages_for_budget,
    top_pages,
    topk_option,
)
from attnpatch.options import option
from attnpatch.registry import register_decode
from attnpatch.sparsity import PageSelection, num_blocks


@register_decode("recycled")
@dataclass
class Recycled(DecodeMethod):
    """Every `stride` steps full attention, which picks the `budget / page_size` most attended pages;
    the steps in between read only those pages and the pages of tokens generated since.

    Per layer: a refresh step (the first decode step, then every `stride` steps, and whenever the
    cache grew by more than one token since the last step, e.g. a new prompt chunk) runs dense
    attention and ranks the pages from the same step's scores (one extra pass over the keys; never
    L × L). The steps after it read the recycled pages ∪ the pages holding tokens generated since that
    refresh.

    Choices: page granularity (pages of `page_size`, 64 by default, the split-KV Triton decode kernel
    running every recycled step; token granularity would need a gathered K/V copy per refresh); a page
    ranked by the attention mass of its tokens; GQA — one page list per KV head, the group's query heads'
    probabilities summed (§0.3 option 2); always kept: the row's first real token's page (sinks; each
    row's own under left padding) and the page of the refresh's query (local context). The refresh
    schedule is decided on the host (a per-layer step counter in the cache layer). Sliding-window layers
    run their window; caches shorter than `min_length` run dense.

    Page size, measured: at 16-token pages (the default until the eighteenth session) 1/16 of SmolLM2's
    8K context (budget 512) scored niah_single_1 0.92 over lm-eval's first 25 prompts against dense's
    1.00 — both misses dropped the needle's last digit, its page not kept (as Quest at 16-token pages);
    at 64-token pages 1.00, KL 0.008 against 0.021; passkey (20 prompts, 8K) 0.75 like dense at both, KL
    0.052 at 64 against 0.043 (bench/results/decode_smollm2/decode_fidelity_*_recycled_*). A budget of fewer than
    8 pages of 64 takes 32-token pages by default (`page_size=0`): at 1/16 of SmolLM2's 4K (budget 256) four
    64-token pages leave two free beside the forced sink and current pages, and niah_single_1 over lm-eval's
    first 100 prompts scored 0.96 at 64-token pages against 1.00 at 32 (eight pages; dense 0.99; CPU float32,
    bench/results/eval_decode_smollm2_recycled_n100/ and eval_decode_smollm2_page32_n100/). Quest went the
    other way there (0.94 at 64 over 50 prompts, 0.89 at 32 over 100; its misses at 16-token pages were needle numbers
    cut at a page boundary), so it keeps 64. Budgets of 8 pages of 64 or more
    (1/16 of 8K and longer, so every compiled speed row) are unchanged. The compiled speeds in the README
    were measured at 16-token pages.

    Stride, measured (the paper leaves it open, 5–50): 32 by default (16 until the twenty-seventh session). At 1/16
    of SmolLM2's 8K over 64 teacher-forced steps on lm-eval's first 25 niah_single_1 prompts, stride 16 / 32 / 64
    all answer like dense (1.00), top-1 agreement 0.993 / 0.988 / 0.987, KL 0.021 / 0.023 / 0.031
    (bench/results/decode_smollm2/decode_fidelity_niah_single_1_recycled_stride_8k_cpu_n25.md); on the next 50
    prompts (held out) 16 and 32 give the same answers (0.96 each, dense 0.94), agreement 0.986 / 0.985, KL 0.025 /
    0.020 (decode_fidelity_niah_single_1_8k_prompts25to74_forced64_cpu_n50.md); at 1/16 of 4K on 50 held-out prompts
    both answer like dense (1.00), but over 64 forced steps 32 has the higher mean KL, 0.037 against 0.016 (one
    prompt at 0.315; median 0.0097 both), agreement 0.972 / 0.981 (..._4k_prompts100to149_forced64_cpu_n50.md).
    Answers of up to `stride` tokens are the same at any stride (one refresh, at the first step). 32 halves the
    refreshes: 2.92× the all-pages kernel against 2.61× at 16 (128K, batch 4, 128-token pages, H200:
    bench/results/hf_decode_h200/recycled_128k_b4_2026-12-06/); 2.14× against 2.05× at 64K, batch 4, 64-token pages
    (H100: bench/results/hf_decode_h100/session27_2026-12-07/). Both figures average a whole stride; the 3.29× and
    2.23× first reported were medians of 16-step runs, which missed the refresh (`period`).

    Ranking: each query head's per-page log-sum-exp of the step's scores (`attnpatch.estimators.page_lse`,
    a fused Triton kernel on the GPU: one pass over the keys, no `[B, Hq, L]` probabilities), softmaxed
    over the row's pages and summed over the KV group — each page's share of the group's attention mass;
    top-k by `topk` ("triton", the default: one launch that combines, masks, forces and selects).

    Compiled steps (`torch.compile` of the model on a static cache): the same schedule decided on the device, without
    a branch (`compiled_step`). The cache layer keeps the recycled pages, the refresh length and the steps since in
    preallocated tensors. Every step reads one page list of fixed width: every page when "refresh now" (no refresh
    yet, `stride` steps since, or the cache grew by more than one token), else the recycled pages and a fixed number
    of recent pages (`ceil(stride / page_size) + 1`, those past the written length dropped) — chosen by `torch.where`,
    so the Triton decode kernel does the work of the list's count. That kernel also writes each listed page's
    log-sum-exp (`attend.with_page_lse`), so a refresh ranks the pages from the same pass over K (before the
    twenty-first session a second kernel read K again for them; a backend without that output still does). The top-k
    kernel runs every step with "refresh now" as a device flag and returns at once when it is clear; its unwritten
    outputs are dropped by `torch.where`. The step is one graph that CUDA graphs replay. Host counters, which a
    compiled step would be guarded on (it recompiled at every token, measured at 32K, batch 4, H100), are not read
    there. (The earlier design, one `torch.cond` per layer, ran each `cond` outside inductor's CUDA graphs: 24.2 ms a
    token against 10.5 ms for the Triton kernel over every page, H200, 32K, batch 4,
    bench/results/hf_decode_h200/recycled_compiled_32k_b4_2026-12-06/.) With `topk="torch"` the compiled step runs
    torch.topk and a sort at every step (no flag to skip them).
    `min_length` compares with the static cache's capacity in a compiled step (as `quest`).
    """

    full_density: ClassVar[dict] = {"budget": 1 << 30}

    budget: int = option(1024, "keys recycled per KV head at a refresh (a multiple of page_size, >= 3 pages)",
                         min=48, max=1 << 30)
    stride: int = option(32, "decode steps from one full-attention refresh to the next (1: every step)", min=1)
    page_size: int = option(0, "tokens per recycled page (0: 64, or 32 where the budget holds fewer than 8 pages "
                                "of 64)", choices=(0, 16, 32, 64, 128))
    topk: str = topk_option("triton")
    min_length: int = option(0, "caches shorter than this run dense", min=0)

    def __post_init__(self) -> None:
        if self.page_size == 0:
            self.page_size = pages_for_budget(self.budget)
        check_budget("recycled", self.budget, self.page_size)

    @property
    def period(self) -> int:
        """One refresh every `stride` steps: a timing covers whole strides."""
        return self.stride

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
        """The schedule of `select` decided on the device, without a branch (see the class docstring)."""
        state = ctx.cache_layer
        lk, ps = key.shape[2], self.page_size
        if ctx.sliding_window is not None or lk < self.min_length:
            return attend(None)
        if not isinstance(state, StaticRecycledLayer) or state.device_schedule is None \
                or state.page_size != ps:
            raise RuntimeError("recycled's compiled decode step keeps its schedule in a static cache's layers: "
                               "generate with cache_implementation='static' (or a StaticCache) under the patch")
        state.host_stale = True  # eager steps after these resume from the cache's written length
        schedule = state.device_schedule
        written = state.cumulative_length.reshape(()).to(torch.long)
        steps = schedule.steps + 1
        refresh_now = (schedule.refresh_at == 0) | (steps >= self.stride) | (written != schedule.refresh_at + steps)
        # one page list of a fixed width: every page on a refresh, else the recycled ones and those written since
        n = num_blocks(lk, ps)
        recycled = self._recycled_pages(schedule.pages, schedule.counts, schedule.refresh_at, written, lk)
        width = recycled.indices.shape[-1]
        listed = recycled.indices[..., :n] if width >= n else torch.nn.functional.pad(recycled.indices, (0, n - width))
        every = torch.arange(n, dtype=torch.int32, device=query.device)
        counts = torch.where(refresh_now, n, recycled.counts).to(torch.int32)
        # the decode kernel writes each listed page's log-sum-exp: on a refresh (every page listed) the ranking
        # needs no second pass over K; a backend that cannot leaves it to `page_lse`
        out, lse = attend.with_page_lse(PageSelection(torch.where(refresh_now, every, listed), counts, ps, lk))
        # the ranking's kernels run every step and skip their work unless refreshing; unwritten lists are dropped
        ranked = self._ranked_pages(query, key, ctx, written, flag=refresh_now.to(torch.int32).reshape(1),
                                    lse=None if lse is None else lse.view(lse.shape[0], key.shape[1], -1, n))
        schedule.pages.copy_(torch.where(refresh_now, ranked.indices.to(schedule.pages.dtype), schedule.pages))
        schedule.counts.copy_(torch.where(refresh_now, ranked.counts.to(schedule.counts.dtype), schedule.counts))
        schedule.refresh_at.copy_(torch.where(refresh_now, written, schedule.refresh_at))
        schedule.steps.copy_(torch.where(refresh_now, torch.zeros_like(steps), steps))
        return out

    def _ranked_pages(self, query, key, ctx: DecodeContext, written: int | torch.Tensor,
                      flag: torch.Tensor | None = None, lse: torch.Tensor | None = None) -> PageSelection:
        """A refresh's page list: the `budget / page_size` pages of most attention mass (each query head's
        share per page, `page_lse` softmaxed over the pages, summed over the KV group) among the row's
        pages, the sink page and the current one (`written - 1`: a host int or a device tensor) forced in.
        `flag`: the kernels skip their work where it reads 0 (lists then unwritten). `lse` `[B, Hkv, G, n]`:
        the per-page log-sum-exp when the step's attention wrote it (else `page_lse` computes it)."""
        b, ps, lk = query.shape[0], self.page_size, key.shape[2]
        device = query.device
        n = num_blocks(lk, ps)
        k = min(self.budget // ps, n)
        if lse is None:
            lse = page_lse(query, key, ps, ctx.scale, ctx.bounds, flag)  # [B, Hkv, G, n]
        first = ctx.bounds.first_key(b, device) // ps
        written = torch.as_tensor(written, device=device)
        end = (written + ps - 1) // ps
        if self.topk == "triton":  # group combine, masks and top-k in one launch where the kernel runs
            sel = group_top_pages(lse, k, first, end, 0, "softmax_sum", lk, ps, flag)
            if sel is not None:
                return sel
        pages = torch.arange(n, device=device)
        valid = (pages.view(1, n) < end) & (pages.view(1, n) >= first.view(b, 1))
        mass = torch.softmax(lse.masked_fill(~valid.view(b, 1, 1, n), float("-inf")), -1).sum(2)
        forced = (pages.view(1, n) == first.view(b, 1)) | (pages == end - 1)
        return top_pages(mass, k, valid.unsqueeze(1), forced.unsqueeze(1), lk, ps, self.topk)

    def _recycled_pages(self, pages, counts, refresh_at: int | torch.Tensor, written: int | torch.Tensor,
                        lk: int) -> PageSelection:
        """The recycled pages ∪ the pages written since the refresh (`refresh_at`, `written`: host ints in an
        eager step, device tensors in a compiled one), a fixed width: `ceil(stride / page_size) + 1` recent
        pages, those past the written length dropped. No sort: the refresh's current page
        (`(refresh_at - 1) // page_size`) is always among the recycled ones, so the recent pages start after
        it, above every recycled page, and are written right after each list's `counts` entries (the list
        stays ascending, without duplicates)."""
        ps = self.page_size
        n = num_blocks(lk, ps)
        b, hkv, width = pages.shape
        device = pages.device
        recent_width = min(n, -(-self.stride // ps) + 1)
        recent = (refresh_at + ps - 1) // ps + torch.arange(recent_width, device=device)
        fresh = (recent <= (written - 1) // ps).sum(dtype=torch.int32)  # a prefix of `recent`
        slots = (counts.long().unsqueeze(-1) + torch.arange(recent_width, device=device)).clamp(
            max=width + recent_width - 1)
        indices = torch.nn.functional.pad(pages.to(torch.int32), (0, recent_width)).scatter(
            -1, slots, recent.clamp(max=n - 1).to(torch.int32).expand(b, hkv, recent_width))
        # every listed page starts before `written` (the cache's count): a static cache's clip would change nothing
        return PageSelection(indices, counts.to(torch.int32) + fresh, ps, lk, within_written=True)
