"""`vertical_slash`: MInference 1.0's online vertical-slash pattern (arXiv 2407.02490; methods.md §10.1),
run as the block selection that contains it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from attnpatch.estimators.keys import first_real_key
from attnpatch.estimators.last_queries import column_sums, diagonal_sums, last_query_attention
from attnpatch.estimators.vertical_slash import column_blocks, diagonal_blocks, top_per_head
from attnpatch.methods.base import PrefillContext
from attnpatch.methods.estimated import BlockScores, EstimatedPrefill
from attnpatch.options import option
from attnpatch.registry import register_prefill
from attnpatch.sparsity import num_blocks
from attnpatch.sparsity.selectors import Threshold


def _smallest(value: int | tuple[int, ...]) -> int:
    return min(value) if isinstance(value, tuple) else value


@register_prefill("vertical_slash")
@dataclass
class VerticalSlash(EstimatedPrefill):
    """MInference vertical-slash: top columns and diagonals from the last queries' attention, as blocks.

    The last `last_queries` queries' exact attention scores every key: vertical score = column sum,
    slash score = sum along each diagonal. Per query head, the first `sink_columns` real columns and
    the `local_diagonals` diagonals ending at the main one are forced, then the top `vertical_size`
    columns and `slash_size` diagonals (forced ones count towards the sizes, as in MInference; a size
    is at least its forced count). Columns / diagonals with zero score (padding) are never picked.

    Granularity: block (`block_size` query × key blocks, default 64 like MInference's kernel). Each
    selected column keeps its key block for every query block; each selected diagonal keeps the (at
    most two) key blocks it crosses in every query block (`estimators/vertical_slash.py`). The result
    is a superset of MInference's token pattern — every (query, key) pair MInference computes is
    computed here — at the price of some density (a block per vertical, up to two per slash and
    query block). Not a `TokenSelection`: its per-query-block key lists would reach the whole prefix
    once 6096 slashes are spread over a 64-query block (`[B, H, L/64, L]` int32 ≈ 32 GiB for 32 heads
    at 128K), while the block mask is `[B, H, L/64, L/64]` booleans (128 MiB).

    GQA: per query head (MInference repeats K/V per head; here the query heads of a group are stacked
    against their KV head). `vertical_size` / `slash_size` may be one value per query head, as in
    MInference's per-head pattern configs.

    [I] / differences: the forced diagonals default to 100 as MInference's online kernel (its pattern
    search uses 30; methods.md says 30 — set `local_diagonals=30` for that); the forced columns start
    at each row's first real token (padding-aware; the original runs batch 1); sizes below the forced
    counts are raised to them (the original raises them to 30 columns / 50 diagonals). Short inputs:
    every size (forced counts included) is capped at `max_share` of the input's keys (default half),
    so an input shorter than the sizes still gets a sparse pattern rather than a complete one (at the
    default sizes this changes inputs below 2 × 6096 keys, where MInference keeps most diagonals);
    `max_share=1` is MInference's clamp to the input length, and then inputs whose sizes cover every
    column or every diagonal run dense. Inputs of at most two blocks run dense.
    """

    fast_from: ClassVar[int | None] = 65536  # H200: 0.96× SDPA cuDNN at 32K, 1.23× at 64K (methods_h200)
    selector: ClassVar = Threshold("keep_level")
    keep_level: ClassVar[float] = 0.5  # the estimate is already the kept-block mask (0 / 1)
    full_density: ClassVar[dict] = {"vertical_size": 1 << 30, "max_share": 1.0}

    vertical_size: int = option(1000, "columns kept per query head (top by the last queries' attention)",
                                min=0, per_head=True)
    slash_size: int = option(6096, "diagonals kept per query head (top by the last queries' attention)",
                             min=0, per_head=True)
    last_queries: int = option(64, "queries (from the end) whose attention scores the pattern", min=1)
    sink_columns: int = option(30, "first real columns always kept", min=0)
    local_diagonals: int = option(100, "diagonals always kept, from the main one leftwards", min=0)
    max_share: float = option(0.5, "largest share of the input's columns / diagonals a size may take (the "
                              "sizes are for long inputs); 1: as MInference", min=0.0, max=1.0)
    block_size: int = option(64, "query and key block size in tokens", choices=(16, 32, 64, 128))

    def cap(self, kv_len: int) -> int:
        """The most columns (diagonals) any size may take on an input of `kv_len` keys."""
        return max(1, int(self.max_share * kv_len))

    def dense_reason(self, q_len: int, kv_len: int, ctx: PrefillContext) -> str | None:
        if num_blocks(kv_len, self.block_size) <= 2:
            return f"input of {kv_len} keys fits in the sink and diagonal blocks ({self.block_size}-token blocks)"
        cap = self.cap(kv_len)
        if min(max(_smallest(self.vertical_size), self.sink_columns), cap) >= kv_len:
            return f"vertical_size covers every one of the {kv_len} columns"
        if min(max(_smallest(self.slash_size), self.local_diagonals), cap) >= kv_len:
            return f"slash_size covers every one of the {kv_len} diagonals"
        return None

    def estimate(self, query: torch.Tensor, key: torch.Tensor, ctx: PrefillContext) -> BlockScores:
        b, hq, lq, _ = query.shape
        lk, device = key.shape[2], query.device
        probs = last_query_attention(query, key, ctx.scale, ctx.bounds, self.last_queries)
        vertical, slash = column_sums(probs), diagonal_sums(probs)
        del probs
        cap = self.cap(lk)
        sink, local = min(self.sink_columns, cap), min(self.local_diagonals, cap)
        pos = torch.arange(lk, device=device)
        first = first_real_key(ctx.bounds, b, lk, device).view(b, 1, 1)
        vertical.masked_fill_((pos >= first) & (pos < first + sink), float("inf"))
        slash.masked_fill_(pos < local, float("inf"))
        n_vert = self.head_parameter("vertical_size", hq, device).clamp(min=sink, max=cap)
        n_slash = self.head_parameter("slash_size", hq, device).clamp(min=local, max=cap)
        columns = top_per_head(vertical, n_vert) & (vertical > 0)
        diagonals = top_per_head(slash, n_slash) & (slash > 0)
        keep = column_blocks(columns, self.block_size).unsqueeze(2) | diagonal_blocks(diagonals, lq, self.block_size)
        return BlockScores(keep)
