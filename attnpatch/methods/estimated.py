"""`EstimatedPrefill`: the base of score-based prefill methods. Its one override point is `estimate`.

`select` does the rest, once for every method:

1. `estimate(query, key, ctx)` returns block scores (or None for a method made of forced regions
   only, such as `a_shape`);
2. the method's `selector` (top-k budget, cumulative mass or threshold; parameter per head from
   the option it names) keeps blocks among the allowed ones;
3. forced regions are added: `sink_blocks` key blocks from each row's first real token (padding
   aware, never a window's start), the `local_blocks` band ending at the diagonal, and every key
   for the query blocks holding the call's last `dense_tail` queries (option of every method here);
4. everything is clipped to what some query of the block may see: causal, sliding window, padding.

GQA: scores with one row per KV head (`BlockScores.per_kv_head`) give one selection per KV group,
shared by its query heads; scores per query head give per-head selections. Without scores the
selection is shared by all heads (stride 0, never materialised per head).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from attnpatch.methods.base import DenseFallback, PrefillContext, PrefillMethod
from attnpatch.options import option, per_head
from attnpatch.sparsity import BlockSelection, num_blocks
from attnpatch.sparsity.regions import allowed_blocks, forced_blocks, tail_blocks
from attnpatch.sparsity.selectors import Selector


@dataclass(frozen=True)
class BlockScores:
    """Importance of every (query block, key block) pair: `values [B, H, R, C]`, higher = keep first.

    `H` is the number of query heads, or of KV heads when `per_kv_head` (one selection per group).
    """

    values: torch.Tensor
    per_kv_head: bool = False


@dataclass
class EstimatedPrefill(PrefillMethod):
    """Base of score-based prefill methods (see the module docstring). Subclasses declare their
    options (at least `block_size`), set `selector` and the forced regions, and override `estimate`.

    `dense_tail` (off by default, so the papers' selections are unchanged): the last queries of a prompt
    produce its first generated token, and a passkey's answer is lost when their blocks miss the needle.
    Keeping one query block dense costs about `2 · block_size / L` of the causal block pairs (0.2 % at 128K
    with 128-token blocks, 6 % at 4K).
    Under chunked prefill every call's last queries are kept."""

    dense_tail: int = option(
        0, "the call's last queries (tokens, rounded up to whole query blocks) attend to every key they may "
           "see; they produce the first generated token", min=0)

    selector: ClassVar[Selector | None] = None
    sink_blocks_default: ClassVar[int] = 1
    local_blocks_default: ClassVar[int] = 1

    def estimate(self, query: torch.Tensor, key: torch.Tensor, ctx: PrefillContext) -> BlockScores | None:
        """The override point: block scores for this call (None: forced regions only)."""
        raise NotImplementedError

    def dense_reason(self, q_len: int, kv_len: int, ctx: PrefillContext) -> str | None:
        """Why this input should run dense (e.g. too short to be worth selecting), or None."""
        return None

    def forced_regions(self) -> tuple[int, int]:
        """`(sink_blocks, local_blocks)`: the method's options of those names, else the class defaults."""
        return (getattr(self, "sink_blocks", self.sink_blocks_default),
                getattr(self, "local_blocks", self.local_blocks_default))

    @classmethod
    def estimate_ignores(cls, option: str) -> bool:
        """Whether `estimate` ignores `option`: true of the selector's parameter, which only the selection
        reads (a rule of this base; tested for every registered method). Calibration then estimates once
        per prompt and reuses the scores for every value of that option it tries."""
        return cls.selector is not None and cls.selector.param == option

    def select(self, query: torch.Tensor, key: torch.Tensor, ctx: PrefillContext) -> BlockSelection | DenseFallback:
        reason = self.dense_reason(query.shape[2], key.shape[2], ctx)
        if reason is not None:
            return DenseFallback(reason)
        return self.select_scores(query, key, ctx, self.estimate(query, key, ctx))

    def select_scores(self, query: torch.Tensor, key: torch.Tensor, ctx: PrefillContext,
                      scores: BlockScores | None) -> BlockSelection:
        """Steps 2–4 of `select` on scores `estimate` returned for these inputs (not re-checked for a dense
        fallback: `select` does that first)."""
        b, hq, lq, _ = query.shape
        hkv, lk = key.shape[1], key.shape[2]
        bs = self.block_size
        device = query.device
        allowed = allowed_blocks(b, lq, lk, bs, bs, ctx.bounds, device)  # [B, 1, R, C]
        sink, local = self.forced_regions()
        keep = (forced_blocks(b, lq, lk, bs, bs, ctx.bounds, sink, local, device)
                | tail_blocks(lq, bs, self.dense_tail, device)) & allowed
        if scores is None:
            sel = BlockSelection.from_block_mask(keep, bs, bs, lq, lk)
            return BlockSelection(sel.indices.expand(b, hq, -1, -1), sel.counts.expand(b, hq, -1), bs, bs, lq, lk)
        if self.selector is None:
            raise TypeError(f"{type(self).__name__} returns scores but sets no selector")
        values = scores.values
        heads = hkv if scores.per_kv_head else hq
        expected = (b, heads, num_blocks(lq, bs), num_blocks(lk, bs))
        if tuple(values.shape) != expected:
            raise ValueError(f"{type(self).__name__}.estimate returned scores {tuple(values.shape)}, "
                             f"expected {expected}")
        param = self.head_parameter(self.selector.param, hq, device)
        if scores.per_kv_head:  # one parameter per group: the most demanding of its query heads
            param = param.view(hkv, hq // hkv).amax(-1)
        picked = (self.selector(values, allowed, param) | keep) & allowed
        if scores.per_kv_head:
            picked = picked.repeat_interleave(hq // hkv, dim=1)
        return BlockSelection.from_block_mask(picked, bs, bs, lq, lk)

    def head_parameter(self, name: str, heads: int, device) -> torch.Tensor:
        """The option `name` as a `[heads]` tensor (a float or one value per query head)."""
        return per_head(getattr(self, name), heads, device)
