"""Proxy-head block scores (ProxyAttn, methods.md §3): one representative head per GQA group ranks the
key blocks, and every query head gets a cheap concentration signal that sets how many of them it keeps.

* Proxy scores: the proxy query is the mean of the group's query heads, its key the group's KV head;
  the token-level softmax of sampled query rows (the last `sample` rows of every query block) is
  max-pooled into `[R, C]` blocks.
* Head mass: each query head's exact attention of the last row of every query block, summed per key
  block (the share of that row's attention each block holds).
* Budget: the fewest blocks whose head mass reaches a coverage γ, clamped to `[lo, hi]`.

Query blocks are processed in chunks: temporaries are `O(chunk rows · Lk)`, never `Lq × Lk`, and no
softmax is materialised: both outputs follow from each (row, key block)'s max score and sum of
exponentials (`block_stats`), one fp32 pass over the scores of a chunk.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from attnpatch.estimators import proxy_triton
from attnpatch.estimators.visibility import visible
from attnpatch.sparsity import KeyBounds, num_blocks

CHUNK_ELEMENTS = 1 << 27  # score elements per chunk of query blocks (one fp32 copy: 512 MiB)


def sampled_rows(q_len: int, block: int, sample: int, device=None) -> torch.Tensor:
    """`[R, S]` row indices: the last `S = min(sample, block)` rows of every query block, the last row
    first (a short last block repeats its first row: harmless to a max)."""
    r = torch.arange(num_blocks(q_len, block), device=device).view(-1, 1)
    end = torch.clamp((r + 1) * block, max=q_len)
    rows = end - 1 - torch.arange(min(sample, block), device=device).view(1, -1)
    return torch.maximum(rows, r * block)


def proxy_scores(query: torch.Tensor, key: torch.Tensor, bounds: KeyBounds, scale: float, block: int,
                 sample: int, chunk_elements: int = CHUNK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """`proxy_scores_torch`'s outputs, from the fused Triton kernel (`proxy_triton`: the row × key scores
    never written) where it takes the inputs, else from the torch path."""
    if proxy_triton.unsupported_reason(query, key, bounds, block) is None:
        rows = sampled_rows(query.shape[2], block, sample, query.device)
        return proxy_triton.proxy_scores_triton(query, key, bounds, scale, block, rows)
    return proxy_scores_torch(query, key, bounds, scale, block, sample, chunk_elements)


def proxy_block_scores(query: torch.Tensor, key: torch.Tensor, bounds: KeyBounds, scale: float, block: int,
                       sample: int, allowed: torch.Tensor, gamma: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                       chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """`[B, Hq, R, C]` float32: each query head's budget left at each key block, `k_{h,r} − rank_{g,r}(c)` —
    `k_{h,r}` the head's `coverage_budget` (`gamma`, `lo`, `hi`: `[Hq]`) and the block's rank among the
    allowed blocks (`allowed` `[B, 1, R, C]`) by its group's proxy score. On CUDA (or the interpreter) two
    fused kernels (`proxy_triton`: statistics, `proxy_budget_triton`: budgets and ranks); else the torch path
    (`proxy_scores`, `coverage_budget`, `rank_blocks`). `ATTNPATCH_PROXY_FUSED=0` keeps the budgets and ranks
    on torch ops (benchmarks: the same run with and without the second kernel)."""
    fused = os.environ.get("ATTNPATCH_PROXY_FUSED", "1") != "0"
    if fused and proxy_triton.block_scores_unsupported_reason(query, key, bounds, block) is None:
        rows = sampled_rows(query.shape[2], block, sample, query.device)
        return proxy_triton.proxy_block_scores_triton(query, key, bounds, scale, block, rows, allowed, gamma, lo, hi)
    proxy, mass = proxy_scores(query, key, bounds, scale, block, sample, chunk_elements)
    rank = rank_blocks(proxy, allowed).repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    return coverage_budget(mass, gamma, lo, hi).unsqueeze(-1) - rank.float()


def proxy_scores_torch(query: torch.Tensor, key: torch.Tensor, bounds: KeyBounds, scale: float, block: int,
                       sample: int, chunk_elements: int = CHUNK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """`(proxy [B, Hkv, R, C], mass [B, Hq, R, C])` (fp32).

    `proxy[b, g, r, c]`: max over the sampled rows `i` of block `r` and the keys `j` of block `c` of
    `softmax_j(σ · mean_{h∈g} q_h,i · k_g,j)` under the call's visibility (causal, padding, window).
    `mass[b, h, r, c]`: `Σ_{j∈c} softmax_j(σ · q_h,i · k_j)` for the last row `i` of block `r`.

    Neither softmax is materialised: per (row, key block) only the block's max score and its sum of
    `exp(score − block max)` are kept (`block_stats`), and both outputs follow from those `[rows, C]`
    statistics. One product per chunk scores the proxy rows and the heads' last rows together (K read
    once); without padding, window or tensor mask only the chunk's diagonal keys are masked.
    """
    b, hq, lq, d = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    g = hq // hkv
    rr, cc = num_blocks(lq, block), num_blocks(lk, block)
    device = query.device
    rows = sampled_rows(lq, block, sample, device)  # rows[:, 0] is each block's last row
    s = rows.shape[1]
    proxy = torch.zeros(b, hkv, rr, cc, dtype=torch.float32, device=device)
    mass = torch.zeros(b, hq, rr, cc, dtype=torch.float32, device=device)
    step = max(1, chunk_elements // max(1, b * (hkv * s + hq) * lk))
    for r0 in range(0, rr, step):
        r1 = min(rr, r0 + step)
        nr, idx = r1 - r0, rows[r0:r1].reshape(-1)
        kend = min(lk, lk - lq + min(r1 * block, lq))  # keys past the chunk's last row are unseen
        cend = num_blocks(kend, block)
        qs = query[:, :, idx].view(b, hkv, g, nr * s, d).mean(2)  # proxy head: sampled rows, group mean
        last = query[:, :, rows[r0:r1, 0]].view(b, hkv, g * nr, d)  # every head: the block's last row
        dots = torch.cat([qs, last], dim=2) @ key[:, :, :kend].transpose(-1, -2)  # [B, Hkv, nr·S + G·nr, kend]
        scored = torch.cat([idx, rows[r0:r1, 0].repeat(g)])  # the query row behind each row of `dots`
        top, sums = block_stats(dots, scale, _hidden(bounds, scored, r0 * block, lq, lk, b, cend * block), block)
        peak = _block_peaks(top, sums)  # each block's largest probability, [B, Hkv, rows, cend]
        proxy[:, :, r0:r1, :cend] = peak[:, :, :nr * s].view(b, hkv, nr, s, cend).amax(3)
        mass[:, :, r0:r1, :cend] = (peak[:, :, nr * s:] * sums[:, :, nr * s:]).view(b, hq, nr, cend)
    return proxy, mass


def _hidden(bounds: KeyBounds, rows: torch.Tensor, first_row: int, q_len: int, kv_len: int, batch: int,
            width: int) -> tuple[int, torch.Tensor]:
    """`(start, hidden [B|1, 1, n, width − start])`: the keys from `start` on that query row `rows[i]` may
    not see; keys before `start` are seen by every row. Causal only: `start` is the chunk's first query
    position (the diagonal band); otherwise 0 (every key checked against the bounds)."""
    start = min(width, kv_len - q_len + first_row) if bounds.is_plain else 0
    vis = visible(bounds, rows, torch.arange(start, width, device=rows.device), q_len, kv_len, batch)
    return start, ~vis.unsqueeze(1)


def block_stats(dots: torch.Tensor, scale: float, hidden: tuple[int, torch.Tensor], block: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """`(top, sums)` `[..., rows, C]` fp32 for scores `dots [..., rows, keys]` (unscaled): per key block
    of `block` keys, the max of `σ · dots` over its visible keys (`-inf`: none) and the sum of
    `exp(σ · dots − top)` over them. `hidden = (start, mask)` masks keys `start ..` (padded on the right
    to `C · block` keys, hidden too). Overwrites a fp32 `dots`."""
    start, mask = hidden
    width = start + mask.shape[-1]
    x = dots.float().mul_(scale)  # in place on a fp32 `dots` (the caller's temporary)
    if width > x.shape[-1]:
        x = F.pad(x, (0, width - x.shape[-1]), value=float("-inf"))
    x[..., start:].masked_fill_(mask, float("-inf"))
    x = x.view(*x.shape[:-1], width // block, block)
    top = x.amax(-1)
    safe = torch.where(torch.isfinite(top), top, 0.0)
    sums = x.sub_(safe.unsqueeze(-1)).exp_().sum(-1)
    return top, sums


def _block_peaks(top: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    """`[..., rows, C]` each key block's largest softmax probability, `exp(top − m) / Z`, from the block
    statistics of `block_stats` (`m` the row max, `Z` the row's denominator; 0 for a row seeing no key).
    A block's probability mass is this times its `sums`."""
    m = top.amax(-1, keepdim=True)
    w = (top - torch.where(torch.isfinite(m), m, 0.0)).exp()
    z = (w * sums).sum(-1, keepdim=True)
    return torch.where(z > 0, w / z, 0.0)


def coverage_budget(mass: torch.Tensor, gamma: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """`[B, H, R]` number of blocks: the fewest whose `mass` (`[B, H, R, C]`) reaches `gamma` of the
    row's total, clamped to `[lo, hi]` (per head `[H]`; `lo` wins over `hi`), rounded up."""
    ordered = mass.sort(-1, descending=True).values
    before = ordered.cumsum(-1) - ordered
    need = (before < gamma.view(1, -1, 1, 1) * ordered.sum(-1, keepdim=True)).sum(-1).float()
    return torch.maximum(torch.minimum(need, hi.view(1, -1, 1)), lo.view(1, -1, 1)).ceil()


def rank_blocks(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """`[B, H, R, C]` long: each block's rank among its row's allowed blocks by descending score (0 =
    best; ties to the lower column); blocks not allowed rank after every allowed one."""
    s = scores.masked_fill(~allowed, float("-inf"))
    order = s.argsort(dim=-1, descending=True, stable=True)
    ranks = torch.arange(s.shape[-1], device=s.device).expand(order.shape)
    return torch.empty_like(order).scatter_(-1, order, ranks)  # the inverse permutation: no second sort
