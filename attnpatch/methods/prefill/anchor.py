"""`anchor`: AnchorAttention (arXiv 2505.23520) — difference-aware stripe selection at token granularity."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from attnpatch.estimators.anchor import pooled_anchors
from attnpatch.estimators.pooled import pooled_scores
from attnpatch.methods.base import DenseFallback, PrefillContext, PrefillMethod
from attnpatch.options import Knob, option, per_head
from attnpatch.registry import register_prefill
from attnpatch.sparsity import num_blocks
from attnpatch.sparsity.regions import query_block_span
from attnpatch.sparsity.tokens import (
    CountedTokenSelection,
    block_key_mask,
    clip_lists,
    compact_mask,
    pad_lists,
    real_keys,
)

_CHUNK_ELEMS = 1 << 26  # pooled-score elements per chunk of big blocks


@register_prefill("anchor")
@dataclass
class AnchorPrefill(PrefillMethod):
    """AnchorAttention: exact sink and local windows, plus key stripes scoring within θ of each row's anchor.

    AnchorAttention: keys inside each row's init (sink) and local windows are computed exactly; every
    earlier key is kept as a *stripe* for a whole big block of `step` query blocks when some pooled query
    of the big block scores within θ of its pooled anchor. Token granularity (`TokenSelection`, executed
    by the gather kernels: reference `token_gather_attention`, Triton gather). GQA: per query head, as the
    released code (which repeats K/V); here K is read per KV head and never repeated.

    Per query block `r` (rows at positions `first_r .. last_r`; queries aligned to the end of the keys),
    big block `g = r // step` (`big = step · block_size` queries), `ks` the row's first real key:

    * init window `[ks, ks + init_blocks · big)`, local window `[local_start_g, last_r]` with
      `local_start_g` = position of the big block's first query − `(local_blocks − 1) · big` [C];
    * anchor of a row = max scaled score over both windows (exact, causal, padding masked) [C]; the
      block's anchor ā_r and pooled query q̄_r are the means over its rows [C] (natural-log units);
    * stripes of big block `g`: keys `j` in exactly `[ks + init_blocks · big, local_start_g)` with
      `σ·q̄_r·k_j + θ ≥ ā_r` for some block `r` of the big block [C, ranges fixed];
    * the list of block `r` = init ∪ stripes(g) ∪ local, ascending, clipped to what some query of the
      block may see (causal, padding, window).

    θ follows the released code, not the spec's wording: its `difference` (default 12) is multiplied
    by log2 e before being compared with log2-domain scores, so θ is in natural-log units of scaled
    scores (a key is kept within a factor e^-θ of the anchor); a log2-unit threshold θ₂ is θ₂ · ln 2.

    Our choices [I] where the release is silent or buggy (methods.md §5.5): the stripe scan covers
    exactly `[init_end, local_start)` (the release scanned `[block_size, start − block_size)`, missing
    the keys just before the local window and listing init keys twice); lengths need not be multiples
    of `step · block_size` (the last big block is shorter and a ragged last block pools its real rows;
    the release ran that remainder dense); batch > 1 with padding: windows start at each row's first
    real key, padding rows are left out of ā and q̄, padding keys are never scanned or listed; chunked
    prefill: big blocks group query blocks in query-index space, windows are placed by absolute
    position; inputs where no big block has keys to scan fall back to dense (`dense_reason`).

    `local_window` [I]: "big_block" (default, as the release) starts a block's local window at its big
    block's first query, so the first block of each big block sees only itself locally; "sliding" gives
    every block the `local_blocks · big` keys before its last query (stripes at or past that window
    are dropped from its list). Measured on SmolLM2 at 4K, step 4, θ = 12, 5 passkey prompts (CPU):
    passkey 0.2 → 0.4 at density 0.72 → 0.73 (dense 1.0): not the main cause of anchor's passkey losses.

    Memory: at most `max_keys` keys per query block; the init and local windows count first (so
    `max_keys ≥ (init_blocks + local_blocks) · big`), then the stripes with the largest margin
    `max_r(σ·q̄_r·k_j + θ − ā_r)` [I]. The estimate costs ≈ L · (init + local) · d multiply-adds per head
    for the anchors and ≈ L² · d / (2 · block_size) for the stripe scan, chunked (never L × L).
    """

    # H200: 0.22× / 0.39× / 0.70× SDPA cuDNN at 32K / 64K / 128K (methods_h200_v2)
    fast_from: ClassVar[int | None] = None
    granularity: ClassVar[str] = "token"
    full_density: ClassVar[dict] = {"theta": 1e30, "max_keys": 1 << 30}
    knob: ClassVar = Knob("theta", 2.0, 24.0, denser="higher")

    block_size: int = option(128, "query block size (rows pooled into one query) in tokens",
                             choices=(16, 32, 64, 128))
    step: int = option(16, "query blocks per big block (stripes are shared by a big block)", min=1)
    theta: float = option(12.0, "keep a key when its pooled score is within θ of the pooled anchor "
                          "(natural-log units of scaled scores, as the released code)", per_head=True)
    init_blocks: int = option(1, "big blocks of the init (sink) window, from each row's first real key", min=1)
    local_blocks: int = option(1, "big blocks of the local window, ending with the query's own", min=1)
    max_keys: int = option(16384, "most keys listed per query block (bounds memory)", min=1)
    local_window: str = option("big_block", "where a query block's local window starts: at its big block's "
                               "start (the release) or local_blocks · big keys before its last query (sliding)",
                               choices=("big_block", "sliding"))

    def __post_init__(self) -> None:
        forced = (self.init_blocks + self.local_blocks) * self.step * self.block_size
        if self.max_keys < forced:
            raise ValueError(f"option 'max_keys' of prefill method 'anchor' must be at least the init + local "
                             f"windows ({forced} keys), got {self.max_keys}")

    def _local_start(self, q_len: int, kv_len: int, r: int) -> int:
        """Where query block `r`'s local window starts (host arithmetic; before clamping at 0)."""
        big = self.step * self.block_size
        if self.local_window == "sliding":
            return kv_len - q_len + min((r + 1) * self.block_size, q_len) - self.local_blocks * big
        return kv_len - q_len + (r // self.step) * big - (self.local_blocks - 1) * big

    def dense_reason(self, q_len: int, kv_len: int) -> str | None:
        big = self.step * self.block_size
        scan_end = self._local_start(q_len, kv_len, num_blocks(q_len, self.block_size) - 1)
        if scan_end <= self.init_blocks * big:
            return f"input of {kv_len} keys fits in the init and local windows ({big}-token big blocks)"
        return None

    def select(self, query: torch.Tensor, key: torch.Tensor, ctx: PrefillContext):
        b, hq, lq, _ = query.shape
        lk = key.shape[2]
        reason = self.dense_reason(lq, lk)
        if reason is not None:
            return DenseFallback(reason)
        device, bounds = query.device, ctx.bounds
        bq, step = self.block_size, self.step
        big = step * bq
        n_r = num_blocks(lq, bq)
        n_g = num_blocks(n_r, step)
        first_q, last_q = query_block_span(lq, lk, bq, device)
        ks = bounds.first_key(b, device)  # [B]
        big_first = first_q[0] + (torch.arange(n_r, device=device) // step) * big
        if self.local_window == "sliding":  # every block sees local_blocks · big keys up to its last query
            local_start = (last_q + 1 - self.local_blocks * big).clamp(min=0)  # [R]
        else:
            local_start = (big_first - (self.local_blocks - 1) * big).clamp(min=0)  # [R]
        init_len = min(self.init_blocks * big, lk)
        init_end = ks + init_len  # [B]: the stripe scan starts here
        local_lo = torch.maximum(local_start.view(1, -1), ks.view(-1, 1))  # [B, R]
        n_init = (torch.minimum(torch.minimum(init_end.view(-1, 1), local_lo), last_q.view(1, -1) + 1)
                  - ks.view(-1, 1)).clamp(min=0)  # [B, R]
        n_loc = (last_q.view(1, -1) + 1 - local_lo).clamp(min=0)  # [B, R]
        real = real_keys(bounds, b, lk, device)
        abar, qbar, _ = pooled_anchors(query, key, ctx.scale, bq, ks, init_len, local_lo,
                                       min(self.local_blocks * big, lk), bounds,
                                       None if real is None else real[:, lk - lq:])
        theta = per_head(self.theta, hq, device).view(1, hq, 1, 1)
        stripe_cap = self.max_keys - (self.init_blocks + self.local_blocks) * big
        needs_clip = bounds.window is not None or bounds.key_valid is not None or bounds.mask is not None
        chunk = max(1, _CHUNK_ELEMS // max(1, b * hq * step * lk))
        parts = []
        for g0 in range(0, n_g, chunk):
            g1 = min(n_g, g0 + chunk)
            r0, r1 = g0 * step, min(n_r, g1 * step)
            n = r1 - r0
            # local_start grows with r: the chunk's last block has the last scan end (host arithmetic)
            scan_hi = max(self._local_start(lq, lk, r1 - 1), 1)
            kpos = torch.arange(scan_hi, device=device)
            in_scan = (kpos >= init_end.view(-1, 1, 1, 1)) & (kpos < local_start[r0:r1].view(1, 1, n, 1))
            if real is not None:
                in_scan = in_scan & real[:, :kpos.numel()].view(b, 1, 1, -1)
            if needs_clip:
                in_scan = in_scan & block_key_mask(bounds, b, lq, lk, bq, r0, r1, kpos.numel(), device)
            margin = pooled_scores(qbar[:, :, r0:r1], key, ctx.scale, kpos.numel()) + theta \
                - abar[:, :, r0:r1].unsqueeze(-1)
            margin = margin.masked_fill(~in_scan, float("-inf"))
            n_pad = (g1 - g0) * step - n
            margin = torch.nn.functional.pad(margin, (0, 0, 0, n_pad), value=float("-inf"))
            best = margin.view(b, hq, g1 - g0, step, -1).amax(3)  # [B, Hq, G, keys]
            hit = best >= 0
            if stripe_cap < hit.shape[-1] and int(hit.sum(-1).max()) > stripe_cap:
                top = best.masked_fill(~hit, float("-inf")).topk(stripe_cap, dim=-1).indices
                hit = hit & torch.zeros_like(hit).scatter_(-1, top, True)
            stripes, n_str = compact_mask(hit)  # [B, Hq, G, S], [B, Hq, G]
            parts.append(self._lists(stripes, n_str, r0, r1, g0, ks, n_init, local_lo, n_loc,
                                     sliding=self.local_window == "sliding"))
        indices, counts = pad_lists(parts)
        if needs_clip:
            indices, counts = clip_lists(indices, counts, bounds, lq, lk, bq)
        return CountedTokenSelection(indices, counts, bq, lq, lk)

    def _lists(self, stripes: torch.Tensor, n_str: torch.Tensor, r0: int, r1: int, g0: int, ks: torch.Tensor,
               n_init: torch.Tensor, local_lo: torch.Tensor, n_loc: torch.Tensor, sliding: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ascending lists of query blocks `r0 .. r1 − 1`: init keys, then the big block's stripes, then
        the local keys (disjoint ranges in that order). Sliding windows: a block keeps only the stripes
        before its own local window (a later block of the big block scanned further)."""
        device = stripes.device
        g = torch.arange(r0, r1, device=device) // self.step - g0
        ns = n_str[:, :, g]  # [B, Hq, n]
        if sliding and stripes.shape[-1]:  # stripes are ascending: count those before the block's window
            width_s = torch.arange(stripes.shape[-1], device=device)
            listed = width_s < ns.unsqueeze(-1)
            before = stripes[:, :, g].long() < local_lo[:, r0:r1].view(-1, 1, r1 - r0, 1)
            ns = (listed & before).sum(-1)
        ni = n_init[:, r0:r1].unsqueeze(1)  # [B, 1, n]
        nl = n_loc[:, r0:r1].unsqueeze(1)
        counts = ni + ns + nl
        width = max(int(counts.max()), 1)
        p = torch.arange(width, device=device)
        if stripes.shape[-1] == 0:
            stripes = torch.zeros(*stripes.shape[:-1], 1, dtype=stripes.dtype, device=device)
        src = stripes[:, :, g]  # [B, Hq, n, S]
        s_idx = (p - ni.unsqueeze(-1)).clamp(0, src.shape[-1] - 1).expand(*ns.shape, width)
        from_stripes = torch.gather(src, -1, s_idx).long()
        before_local = (ni + ns).unsqueeze(-1)
        idx = torch.where(p < ni.unsqueeze(-1), ks.view(-1, 1, 1, 1) + p,
                          torch.where(p < before_local, from_stripes,
                                      local_lo[:, r0:r1].view(-1, 1, r1 - r0, 1) + p - before_local))
        idx = torch.where(p < counts.unsqueeze(-1), idx, 0)
        return idx.to(torch.int32), counts.to(torch.int32)
