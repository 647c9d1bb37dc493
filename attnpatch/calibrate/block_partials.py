"""Exact block-sparse attention for many selections of one prompt, from per-(row, key block) partials.

Calibration evaluates a method at several knob values on the same recorded Q/K/V. Every one of those
block selections is a subset of key blocks per (head, query row), so the attention of row `i` restricted
to kept blocks `c` is the log-sum-exp merge of that row's softmax partials over each key block:
`m_ic` (row max of the visible scores in block c), `l_ic = Σ exp(s − m_ic)` (`denom`) and `o_ic = Σ exp(s − m_ic) v`.
`BlockPartials.compute` builds them once (one pass: the cost of dense attention) and `attend` merges any
selection's kept blocks in `O(Lq · C · D)`, against a masked dense attention per selection before.
Memory is `Hq · Lq · C · (D + 2)` floats, so `fits` bounds it and callers fall back above it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnpatch.sparsity import BlockSelection, KeyBounds, num_blocks

MAX_ELEMENTS = 1 << 28  # floats of partials kept for one prompt (1 GiB)
ROWS = 512  # query rows per chunk of `compute`


@dataclass
class BlockPartials:
    """Softmax partials of one prompt's exact float32 attention per (batch, query head, row, key block)."""

    m: torch.Tensor  # [B, Hq, Lq, C], -inf where the row sees no key of the block
    denom: torch.Tensor  # [B, Hq, Lq, C]
    o: torch.Tensor  # [B, Hq, Lq, C, D], un-normalised
    block_k: int

    @staticmethod
    def fits(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_k: int) -> bool:
        b, hq, lq, _ = query.shape
        return b * hq * lq * num_blocks(key.shape[2], block_k) * (value.shape[-1] + 2) <= MAX_ELEMENTS

    @classmethod
    def compute(cls, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, bounds: KeyBounds,
                block_k: int) -> BlockPartials:
        b, hq, lq, _ = query.shape
        hkv, lk, dv = key.shape[1], key.shape[2], value.shape[-1]
        g, c = hq // hkv, num_blocks(lk, block_k)
        pad = c * block_k - lk
        visible = bounds.dense_mask(b, lq, lk, query.device)  # [B, 1, Lq, Lk]
        visible = torch.nn.functional.pad(visible, (0, pad), value=False).view(b, 1, lq, c, block_k)
        v = torch.nn.functional.pad(value.float(), (0, 0, 0, pad)).view(b, hkv, c, block_k, dv)
        m = torch.full((b, hq, lq, c), float("-inf"))
        denom = torch.zeros(b, hq, lq, c)
        o = torch.zeros(b, hq, lq, c, dv)
        causal = getattr(bounds, "causal", True)
        for r0 in range(0, lq, ROWS):  # row chunks: key blocks past a chunk's last row are never visible
            r1 = min(lq, r0 + ROWS)
            cend = num_blocks(min(lk, lk - lq + r1), block_k) if causal else c
            seen = visible[:, 0, r0:r1, :cend]
            for h in range(hq):  # one head at a time: the scores are [B, rows, cend · block_k]
                s = torch.einsum("bid,bjd->bij", query[:, h, r0:r1].float(), key[:, h // g].float()) * scale
                s = torch.nn.functional.pad(s, (0, c * block_k - lk))[..., :cend * block_k].view(b, r1 - r0, cend, block_k)
                s = s.masked_fill(~seen, float("-inf"))
                mh = s.amax(-1)
                p = torch.exp(s - torch.where(torch.isinf(mh), 0.0, mh).unsqueeze(-1))  # exp(-inf) = 0 where unseen
                m[:, h, r0:r1, :cend], denom[:, h, r0:r1, :cend] = mh, p.sum(-1)
                o[:, h, r0:r1, :cend] = torch.einsum("bicj,bcjd->bicd", p, v[:, h // g, :cend])
        return cls(m, denom, o, block_k)

    def attend(self, selection: BlockSelection) -> torch.Tensor:
        """`[B, Hq, Lq, D]` float32: attention over the selection's kept blocks (the bounds of `compute`)."""
        if selection.block_k != self.block_k:
            raise ValueError(f"selection blocks of {selection.block_k} keys; partials of {self.block_k}")
        lq = self.m.shape[2]
        keep = selection.to_block_mask().repeat_interleave(selection.block_q, 2)[:, :, :lq]  # [B, Hq, Lq, C]
        m = self.m.masked_fill(~keep, float("-inf"))
        top = m.amax(-1, keepdim=True)
        w = torch.exp(m - torch.where(torch.isinf(top), 0.0, top))  # 0 for dropped or unseen blocks
        total = (w * self.denom).sum(-1, keepdim=True)
        out = torch.einsum("bhic,bhicd->bhid", w, self.o)
        return out / torch.where(total > 0, total, 1.0)
