"""Proxy-head block scores (ProxyAttn, methods.md §3): one representative head per GQA group ranks the
key blocks, and every query head gets a cheap concentration signal that sets how many of them it keeps.

* Proxy scores: the proxy query is the mean of the group's query heads, its key the group's KV head;
  the token-level softmax of sampled query rows (the last `sample` rows of every query block) is
  max-pooled into `[R, C]` blocks.
* Head mass: each query head's exact attention of the last row of every query block, summed per key
  block (the share of that row's attention each block holds).
* Budget: the fewest blocks whose head mass reaches a coverage γ, clamped to `[lo, hi]`.

Query blocks are processed in chunks: temporaries are `O(chunk rows · Lk)`, never `Lq × Lk`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnpatch.estimators.visibility import visible
from attnpatch.sparsity import KeyBounds, num_blocks

CHUNK_ELEMENTS = 1 << 26  # score elements per chunk of query blocks (fp32: 256 MiB)


def sampled_rows(q_len: int, block: int, sample: int, device=None) -> torch.Tensor:
    """`[R, S]` row indices: the last `S = min(sample, block)` rows of every query block, the last row
    first (a short last block repeats its first row: harmless to a max)."""
    r = torch.arange(num_blocks(q_len, block), device=device).view(-1, 1)
    end = torch.clamp((r + 1) * block, max=q_len)
    rows = end - 1 - torch.arange(min(sample, block), device=device).view(1, -1)
    return torch.maximum(rows, r * block)


def proxy_scores(query: torch.Tensor, key: torch.Tensor, bounds: KeyBounds, scale: float, block: int,
                 sample: int, chunk_elements: int = CHUNK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """`(proxy [B, Hkv, R, C], mass [B, Hq, R, C])` (fp32).

    `proxy[b, g, r, c]`: max over the sampled rows `i` of block `r` and the keys `j` of block `c` of
    `softmax_j(σ · mean_{h∈g} q_h,i · k_g,j)` under the call's visibility (causal, padding, window).
    `mass[b, h, r, c]`: `Σ_{j∈c} softmax_j(σ · q_h,i · k_j)` for the last row `i` of block `r`.
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
        vis = visible(bounds, idx, torch.arange(cend * block, device=device), lq, lk, b)  # [B|1, n, cend·bs]
        keys = key[:, :, :kend].transpose(-1, -2)
        # proxy head: token-level softmax of the sampled rows, max-pooled into blocks
        qs = query[:, :, idx].view(b, hkv, g, nr * s, d).mean(2)
        probs = _softmax(qs @ keys, scale, vis.unsqueeze(1), cend * block)
        proxy[:, :, r0:r1, :cend] = probs.view(b, hkv, nr, s, cend, block).amax(dim=(3, 5))
        # every query head: exact attention of the block's last row, summed per key block
        last = query[:, :, rows[r0:r1, 0]].view(b, hkv, g * nr, d)
        seen = vis.view(vis.shape[0], 1, nr, s, -1)[:, :, :, 0]  # [B|1, 1, nr, cend·bs]
        probs = _softmax((last @ keys).view(b, hq, nr, kend), scale, seen, cend * block)
        mass[:, :, r0:r1, :cend] = probs.view(b, hq, nr, cend, block).sum(-1)
    return proxy, mass


def _softmax(dots: torch.Tensor, scale: float, vis: torch.Tensor, width: int) -> torch.Tensor:
    """fp32 softmax of `scale · dots` over the visible keys, padded on the right to `width` keys; a row
    that sees no key (padding) is all zeros."""
    logits = F.pad(dots.float() * scale, (0, width - dots.shape[-1])).masked_fill(~vis, float("-inf"))
    return torch.softmax(logits, -1).nan_to_num(0.0)


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
    return order.argsort(dim=-1)
