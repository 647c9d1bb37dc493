"""`flexprefill`: context-aware vertical-slash budgets and query-aware heads (FlexPrefill, ICLR 2025;
methods.md §10.3)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from attnpatch.estimators.keys import first_real_key, real_keys
from attnpatch.estimators.last_queries import diagonal_sums, last_query_attention
from attnpatch.estimators.pooled import pool_blocks, pooled_block_attention
from attnpatch.estimators.vertical_slash import block_diagonals, block_sums, top_per_head
from attnpatch.methods.base import PrefillContext
from attnpatch.methods.estimated import BlockScores, EstimatedPrefill
from attnpatch.options import Knob, option
from attnpatch.registry import register_prefill
from attnpatch.sparsity import num_blocks
from attnpatch.sparsity.selectors import Threshold


def coverage_count(x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """`[B, H]` long: how many of the largest entries of `x [B, H, N]` it takes to reach `gamma` (`[H]`)
    of the row's total (the entry that crosses it included); `gamma >= 1` counts every entry."""
    ordered = x.sort(dim=-1, descending=True).values
    before = ordered.cumsum(-1) - ordered
    g = gamma.view(1, -1, 1)
    need = (before < g * ordered.sum(-1, keepdim=True)) | (g >= 1.0)
    return need.sum(-1)


def global_mass(scores: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """`[B, H, R, C]` bool: the largest entries of each head's whole block matrix until they hold `gamma`
    (`[H]`) of its total mass (FlexPrefill's one sort over all block pairs, not per row)."""
    b, h, r, c = scores.shape
    flat = scores.reshape(b, h, r * c)
    ordered, order = flat.sort(dim=-1, descending=True, stable=True)
    before = ordered.cumsum(-1) - ordered
    g = gamma.view(1, -1, 1)
    keep = (before < g * ordered.sum(-1, keepdim=True)) | (g >= 1.0)
    return torch.zeros_like(keep).scatter(-1, order, keep).view(b, h, r, c)


def sqrt_js_distance(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Square root of the Jensen–Shannon divergence (natural log) between distributions over the last axis."""
    m = (p + q) / 2

    def kl(a: torch.Tensor) -> torch.Tensor:
        return (torch.xlogy(a, a) - torch.xlogy(a, m)).sum(-1)

    return (0.5 * kl(p) + 0.5 * kl(q)).clamp(min=0).sqrt()


@register_prefill("flexprefill")
@dataclass
class FlexPrefill(EstimatedPrefill):
    """FlexPrefill: per head, vertical-slash or query-aware pooled blocks up to coverage γ.

    Per query head, from the exact attention of the last query block (`block_size` queries):

    1. vertical = mean attention per column, slash = diagonal sums / queries; the number of top
       columns (diagonals) covering `gamma` of their mass, converted to blocks (`count // block_size
       + 1`) and clamped to `[min_budget, max_budget]` (tokens, rounded up to blocks);
    2. query-aware test: the square-root Jensen–Shannon distance between `softmax(mean(last q) ·
       pooled K)` and the block-summed vertical distribution; below `tau` the head is query-aware;
    3. vertical-slash heads keep the top column blocks (summed vertical mass) and the top
       block-diagonals (slash mass summed over offsets `[d·bs, (d+1)·bs)`) within their budgets;
    4. query-aware heads get `min_budget` vertical / slash blocks, unioned with the pooled Q/K block
       attention's largest pairs — one sort over the head's whole block matrix — until they hold
       `gamma` of its mass (`gamma · #query blocks` in the original, where every row sums to 1).

    The first vertical block (each row's first real token) and the last slash block (the diagonal)
    are always kept. Granularity: `block_size` blocks. GQA: per query head (the original groups the
    query heads on their KV head without repeating K, as here). `gamma` and `tau` may be one value per
    query head. Inputs up to `max(2 blocks, min_budget)` keys run dense (as the original), where
    `min_budget` is capped at `max_share` of the input (default half: a 300-token input gets a
    150-token least budget instead of running dense; inputs of 2 × 512 keys or more are unchanged;
    `max_share=1` is the original).

    [I] / differences: budgets divide by `block_size` (the released code divides by a hard-coded 128,
    its default block); the coverage counts include the entry that crosses `gamma` (the pooled
    global selection of the original stops just before it); a block-diagonal `d` is, for each query
    block, the key block `d` blocks left of the block holding its last query (chunked prefill);
    padding keys are masked from every score and from the pooled means; `max_budget = 0` means no cap
    (None in the original).
    """

    fast_from: ClassVar[int | None] = 32768  # H200: 1.27× SDPA cuDNN at 32K, 2.07× at 128K (methods_h200)
    selector: ClassVar = Threshold("keep_level")
    keep_level: ClassVar[float] = 0.5  # the estimate is already the kept-block mask (0 / 1)
    full_density: ClassVar[dict] = {"gamma": 1.0, "tau": 0.0, "min_budget": 0}
    knob: ClassVar = Knob("gamma", 0.5, 0.999, denser="higher")

    gamma: float = option(0.9, "attention mass the vertical / slash budgets (and query-aware blocks) cover",
                          min=0.0, max=1.0, per_head=True)
    tau: float = option(0.1, "query-aware head when the sqrt-JS distance is below this", min=0.0, max=1.0,
                        per_head=True)
    min_budget: int = option(512, "least vertical / slash budget in tokens (rounded up to blocks)", min=0)
    max_budget: int = option(0, "largest vertical / slash budget in tokens; 0: no cap", min=0)
    max_share: float = option(0.5, "min_budget is capped at this share of the input's keys (short inputs); "
                              "1: as FlexPrefill, which runs inputs up to min_budget dense", min=0.0, max=1.0)
    block_size: int = option(128, "query and key block size in tokens", choices=(16, 32, 64, 128))

    def least_budget(self, kv_len: int) -> int:
        """`min_budget` in tokens for an input of `kv_len` keys (capped at `max_share` of them)."""
        return min(self.min_budget, int(self.max_share * kv_len))

    def dense_reason(self, q_len: int, kv_len: int, ctx: PrefillContext) -> str | None:
        bs = self.block_size
        limit = max(2 * bs, math.ceil(self.least_budget(kv_len) / bs) * bs)
        if kv_len <= limit:
            return f"input of {kv_len} keys is within max(2 blocks, min_budget) = {limit} tokens"
        return None

    def estimate(self, query: torch.Tensor, key: torch.Tensor, ctx: PrefillContext) -> BlockScores:
        b, hq, lq, d = query.shape
        hkv, lk = key.shape[1], key.shape[2]
        bs, device = self.block_size, query.device
        gamma = self.head_parameter("gamma", hq, device)
        tau = self.head_parameter("tau", hq, device)

        probs = last_query_attention(query, key, ctx.scale, ctx.bounds, bs)  # [B, Hq, n, Lk]
        n = probs.shape[2]
        vertical, slash = probs.mean(-2), diagonal_sums(probs) / n
        del probs
        cols = num_blocks(lk, bs)
        lo = max(1, math.ceil(self.least_budget(lk) / bs))
        hi = min(cols, math.ceil(self.max_budget / bs)) if self.max_budget > 0 else cols
        n_vert = (coverage_count(vertical, gamma) // bs + 1).clamp(min=lo).clamp(max=hi)
        n_slash = (coverage_count(slash, gamma) // bs + 1).clamp(min=lo).clamp(max=hi)
        vert_blocks, slash_blocks = block_sums(vertical, bs), block_sums(slash, bs)  # [B, Hq, C]

        # Query-aware heads: the pooled estimate of the last queries agrees with their true block mass.
        real = real_keys(ctx.bounds, b, lk, device)
        pooled_k = pool_blocks(key, bs, real)  # [B, Hkv, C, D]
        mean_q = query[:, :, lq - n:].float().mean(2).view(b, hkv, hq // hkv, d)
        est = torch.matmul(mean_q, pooled_k.transpose(-1, -2)).view(b, hq, cols) * ctx.scale
        if real is not None:
            est.masked_fill_(~block_sums(real.to(torch.float32).unsqueeze(1), bs).gt(0), float("-inf"))
        aware = sqrt_js_distance(torch.softmax(est, -1), vert_blocks) < tau.view(1, -1)  # [B, Hq]
        n_vert = torch.where(aware, lo, n_vert)
        n_slash = torch.where(aware, lo, n_slash)

        first = first_real_key(ctx.bounds, b, lk, device) // bs
        vert_blocks.scatter_(-1, first.view(b, 1, 1).expand(b, hq, 1), float("inf"))
        slash_blocks[..., 0] = float("inf")
        keep = top_per_head(vert_blocks, n_vert).unsqueeze(2) | block_diagonals(top_per_head(slash_blocks, n_slash),
                                                                               lq, lk, bs)
        pooled = global_mass(pooled_block_attention(query, key, ctx.scale, ctx.bounds, bs), gamma)
        return BlockScores(keep | (aware.view(b, hq, 1, 1) & pooled))
