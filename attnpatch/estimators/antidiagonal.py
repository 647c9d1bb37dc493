"""XAttention's antidiagonal block scores: per block pair, the softmax mass that a stride-S antidiagonal
sample of q·k assigns to it.

Queries are grouped in runs of S from the first query of the call, keys in runs of S from key 0.
The score of (query group g, key group g') is the sum of one antidiagonal of that S×S tile,
`Σ_t q[gS + S-1-t] · k[g'S + t]` — one GEMM on a reshaped Q (its S rows, reversed, side by side) and
a reshaped K (its S rows side by side; a free view). Scaled by `scale / S`, softmax over the key
groups each query group may see, then summed into `block × block` pairs.

Group-level visibility, as XAttention: a key group is visible when its first key is at or before the
group's last query (the diagonal tile's antidiagonal includes its few future pairs; they only score,
they are never attended). Padding keys are zeroed before the GEMM and key groups holding no real key
are masked, so padding never adds mass; query groups holding no real query score nothing.

Cost: `Lq·Lk·D/S` FLOPs per query head (1/S of QKᵀ, causally halved). The fused Triton kernel
(`antidiagonal_triton`: online softmax, the scores never written) runs where it takes the inputs; the
torch path (`antidiagonal_block_scores_torch`, its reference and fallback) runs in chunks of query blocks
whose float32 temporaries stay near `chunk_elems` elements (never L×L).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnpatch.estimators import antidiagonal_triton
from attnpatch.estimators.keys import real_keys
from attnpatch.sparsity import KeyBounds, num_blocks

CHUNK_ELEMS = 1 << 26  # query-group × key-group scores per chunk (256 MiB in float32)


def antidiagonal_block_scores(query: torch.Tensor, key: torch.Tensor, scale: float, bounds: KeyBounds,
                              block: int, stride: int, chunk_elems: int = CHUNK_ELEMS) -> torch.Tensor:
    """`[B, Hq, R, C]` float32 antidiagonal mass per (query block, key block) (see the module docstring).

    query `[B, Hq, Lq, D]`, key `[B, Hkv, Lk, D]`; `block` a multiple of `stride`. Each real query
    group's row sums to 1, so a query block's row sums to its number of real query groups. The Triton
    kernel runs when it takes the inputs (CUDA, or CPU under the interpreter; not while torch.compile
    traces), else the torch path; `chunk_elems` only applies to the torch path.
    """
    if (not torch.compiler.is_compiling()
            and antidiagonal_triton.unsupported_reason(query, key, block, stride) is None):
        return antidiagonal_triton.antidiagonal_block_scores_triton(query, key, scale, bounds, block, stride)
    return antidiagonal_block_scores_torch(query, key, scale, bounds, block, stride, chunk_elems)


def antidiagonal_block_scores_torch(query: torch.Tensor, key: torch.Tensor, scale: float, bounds: KeyBounds,
                                    block: int, stride: int, chunk_elems: int = CHUNK_ELEMS) -> torch.Tensor:
    """The torch path of `antidiagonal_block_scores` (reference of the Triton kernel, and its fallback):
    float32 group scores materialised in chunks of query blocks of about `chunk_elems` scores."""
    if block % stride:
        raise ValueError(f"block size {block} must be a multiple of the stride {stride}")
    b, hq, lq, d = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    g = hq // hkv
    device = query.device
    rows, cols = num_blocks(lq, block), num_blocks(lk, block)
    per = block // stride  # groups per block
    off = lk - lq

    real = real_keys(bounds, b, lk, device)  # [B, Lk] or None
    k = key if real is None else key * real.view(b, 1, lk, 1).to(key.dtype)
    if lk % block:
        k = F.pad(k, (0, 0, 0, cols * block - lk))
    k = k.reshape(b, hkv, cols * per, stride * d)  # each key group's S rows side by side (a view when contiguous)

    # Key-group visibility ingredients: first key of each group, and whether it holds a real key.
    kfirst = torch.arange(cols * per, device=device) * stride  # [Ng]
    kreal = None
    if real is not None:
        kreal = F.pad(real, (0, cols * block - lk)).view(b, cols * per, stride).any(-1)  # [B, Ng]
    qreal = None
    if real is not None:  # a query is real when its own key position is
        qreal = F.pad(real[:, off:], (0, rows * block - lq)).view(b, rows * per, stride).any(-1)

    out = torch.zeros(b, hq, rows, cols, dtype=torch.float32, device=device)
    step = max(1, chunk_elems // max(1, b * hq * per * per * cols))  # query blocks per chunk
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        ng = (r1 - r0) * per  # query groups in the chunk
        group_start = torch.arange(r0 * per, r1 * per, device=device) * stride  # first query of each group
        last_q = off + torch.clamp(group_start + stride, max=lq) - 1
        ncols = min(cols, (off + min(r1 * block, lq) - 1) // block + 1)  # key blocks this chunk may see
        nk = ncols * per
        qc = F.pad(query[:, :, r0 * block:r1 * block], (0, 0, 0, max(0, r1 * block - lq)))  # ragged last block
        qc = qc.reshape(b, hq, ng, stride, d).flip(3).reshape(b, hkv, g * ng, stride * d)
        s = torch.matmul(qc, k[:, :, :nk].transpose(-1, -2)).view(b, hq, ng, nk).float() * (scale / stride)
        vis = (kfirst[:nk].view(1, 1, 1, nk) <= last_q.view(1, 1, ng, 1))
        if bounds.window is not None:
            first_q = off + group_start
            vis = vis & (kfirst[:nk].view(1, 1, 1, nk) + stride - 1 > first_q.view(1, 1, ng, 1) - bounds.window)
        if kreal is not None:
            vis = vis & kreal[:, :nk].view(b, 1, 1, nk)
        if qreal is not None:
            vis = vis & qreal[:, r0 * per:r1 * per].view(b, 1, ng, 1)
        vis = vis & (group_start < lq).view(1, 1, ng, 1)
        p = torch.softmax(s.masked_fill_(~vis, float("-inf")), dim=-1).nan_to_num_(0.0)
        out[:, :, r0:r1, :ncols] = p.view(b, hq, r1 - r0, per, ncols, per).sum(dim=(3, 5))
    return out
