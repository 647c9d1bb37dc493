"""Exact block-sparse attention for many selections of one prompt, from per-(row, key block) partials.

Calibration evaluates a method at several knob values on the same recorded Q/K/V. Every one of those
block selections is a subset of key blocks per (head, query row), so the attention of row `i` restricted
to kept blocks `c` is the log-sum-exp merge of that row's softmax partials over each key block:
`m_ic` (row max of the visible scores in block c), `l_ic = Σ exp(s − m_ic)` (`denom`) and `o_ic = Σ exp(s − m_ic) v`.
`BlockPartials.compute` builds them once (one pass: the cost of dense attention) and `attend` merges any
selection's kept blocks in `O(Lq · C · D)`, against a masked dense attention per selection before. The
partials' row maxima also decide BLASST's run-time skips (`skipped`), so a skip selection is measured
without re-running the executor.
Memory is `Hq · Lq · C · (D + 2)` floats, so `fits` bounds it and callers fall back above it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from attnpatch.backends.reference import negligible_rows
from attnpatch.sparsity import BlockSelection, KeyBounds, num_blocks

MAX_ELEMENTS = 1 << 28  # floats of partials kept for one prompt (1 GiB)
ROWS = 512  # query rows per chunk of `compute`


@dataclass
class BlockPartials:
    """Softmax partials of one prompt's exact float32 attention per (batch, query head, row, key block), for
    all query rows or for the rows `row0 ..` of one row chunk (`compute(rows=...)`)."""

    m: torch.Tensor  # [B, Hq, Lq, W], -inf where the row sees no key of the block
    denom: torch.Tensor  # [B, Hq, Lq, W]
    o: torch.Tensor  # [B, Hq, Lq, W, D], un-normalised
    block_k: int
    row0: int = 0  # the first query row these partials hold
    col0: int = 0  # the first key block they hold (W blocks from it: those the rows may see)

    @staticmethod
    def fits(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_k: int) -> bool:
        b, hq, lq, _ = query.shape
        return b * hq * lq * num_blocks(key.shape[2], block_k) * (value.shape[-1] + 2) <= MAX_ELEMENTS

    @classmethod
    def compute(cls, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, bounds: KeyBounds,
                block_k: int, rows: tuple[int, int] | None = None) -> BlockPartials:
        """The partials of every query row, or of rows `r0 .. r1` (`rows`) of the query. Only the key blocks
        some row of an inner chunk may see (causal end, sliding-window start) are computed."""
        b, hq, lq, _ = query.shape
        first, last = rows if rows is not None else (0, lq)
        hkv, lk, dv = key.shape[1], key.shape[2], value.shape[-1]
        g, c = hq // hkv, num_blocks(lk, block_k)
        pad = c * block_k - lk
        k = torch.nn.functional.pad(key.float(), (0, 0, 0, pad))
        v = torch.nn.functional.pad(value.float(), (0, 0, 0, pad)).view(b, hkv, c, block_k, dv)
        causal = getattr(bounds, "causal", True)
        window = bounds.window if causal and bounds.mask is None else None

        # key blocks rows r0..r1 may see: causal end, window start
        def blocks_seen(r0: int, r1: int) -> tuple[int, int]:
            cend = num_blocks(min(lk, lk - lq + r1), block_k) if causal else c
            return (min(cend, max(0, lk - lq + r0 - window + 1) // block_k) if window else 0), cend

        n = last - first
        col0, width = blocks_seen(first, first + 1)[0], blocks_seen(last - 1, last)[1]
        width -= col0
        dev = query.device
        m = torch.full((b, hq, n, width), float("-inf"), device=dev)
        denom = torch.zeros(b, hq, n, width, device=dev)
        o = torch.zeros(b, hq, n, width, dv, device=dev)
        for r0 in range(first, last, ROWS):  # row chunks: key blocks past a chunk's last row are never visible
            r1 = min(last, r0 + ROWS)
            cstart, cend = blocks_seen(r0, r1)
            k0, k1 = cstart * block_k, cend * block_k
            w0, w1 = cstart - col0, cend - col0
            seen = bounds.rows_mask(b, lq, lk, (r0, r1), (k0, k1), dev).view(b, r1 - r0, cend - cstart, block_k)
            i0, i1 = r0 - first, r1 - first
            for h in range(hq):  # one head at a time: the scores are [B, rows, keys seen]
                s = torch.einsum("bid,bjd->bij", query[:, h, r0:r1].float(), k[:, h // g, k0:k1]) * scale
                s = s.view(b, r1 - r0, cend - cstart, block_k).masked_fill_(~seen, float("-inf"))
                mh = s.amax(-1)
                p = torch.exp(s - torch.where(torch.isinf(mh), 0.0, mh).unsqueeze(-1))  # exp(-inf) = 0 where unseen
                m[:, h, i0:i1, w0:w1], denom[:, h, i0:i1, w0:w1] = mh, p.sum(-1)
                o[:, h, i0:i1, w0:w1] = torch.einsum("bicj,bcjd->bicd", p, v[:, h // g, cstart:cend])
        return cls(m, denom, o, block_k, first, col0)

    def _rows(self, selection: BlockSelection) -> slice:
        """The selection's query blocks these partials cover."""
        bq = selection.block_q
        if self.row0 % bq:
            raise ValueError(f"partials from row {self.row0}: not the start of a query block of {bq}")
        return slice(self.row0 // bq, self.row0 // bq + num_blocks(self.m.shape[2], bq))

    def _slots(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Selection slots as positions in the held key blocks (clamped) and whether the block is held."""
        local = indices.long() - self.col0
        width = self.m.shape[3]
        return local.clamp(0, width - 1), (local >= 0) & (local < width)

    def attend(self, selection: BlockSelection, skipped: torch.Tensor | None = None) -> torch.Tensor:
        """`[B, Hq, Lq, D]` float32: attention over the selection's kept blocks (the bounds of `compute`);
        `skipped` (`[B, Hq, R, K]`, as `skipped`) drops those selection slots too. Partials of a row
        chunk give those rows (`[B, Hq, rows, D]`)."""
        if selection.block_k != self.block_k:
            raise ValueError(f"selection blocks of {selection.block_k} keys; partials of {self.block_k}")
        lq, rows, width = self.m.shape[2], self._rows(selection), self.m.shape[3]
        keep = selection.to_block_mask()[:, :, rows, self.col0:self.col0 + width]  # [B, Hq, R, W]
        if skipped is not None:
            slots, held = self._slots(selection.indices[:, :, rows])
            dropped = torch.zeros_like(keep, dtype=torch.int32).scatter_add_(-1, slots.expand(skipped.shape),
                                                                            (skipped & held).int())
            keep = keep & (dropped == 0)
        keep = keep.repeat_interleave(selection.block_q, 2)[:, :, :lq]  # [B, Hq, Lq, C]
        m = self.m.masked_fill(~keep, float("-inf"))
        top = m.amax(-1, keepdim=True)
        w = torch.exp(m - torch.where(torch.isinf(top), 0.0, top))  # 0 for dropped or unseen blocks
        total = (w * self.denom).sum(-1, keepdim=True)
        out = torch.einsum("bhic,bhicd->bhid", w, self.o)
        return out / torch.where(total > 0, total, 1.0)

    def skipped(self, selection: BlockSelection) -> torch.Tensor:
        """`[B, Hq, R, K]`: the slots BLASST's skip rule (`selection.skip`) drops, decided as the reference
        executor decides them — slots in list order; a slot is dropped when every row of its (head, query
        block) has its tile max below the running max of the earlier slots + the log threshold, and some
        row sees a key of it — from the partials' row maxima, so no tile is recomputed (the query blocks of
        a row chunk's partials only)."""
        if selection.skip is None:
            raise ValueError("the selection has no skip rule")
        b, hq, lq, width = self.m.shape
        rows, bq, kmax = self._rows(selection), selection.block_q, selection.indices.shape[-1]
        indices, counts = selection.indices[:, :, rows], selection.counts[:, :, rows]
        r = indices.shape[2]
        m = torch.nn.functional.pad(self.m, (0, 0, 0, r * bq - lq), value=float("-inf")).view(b, hq, r, bq, width)
        slots, held = self._slots(indices)
        listed = torch.arange(kmax, device=counts.device) < counts.unsqueeze(-1)  # [B, Hq, R, K]
        tile_max = torch.gather(m, -1, slots.expand(b, hq, r, kmax).unsqueeze(3).expand(b, hq, r, bq, kmax))
        tile_max = tile_max.masked_fill(~(listed & held).unsqueeze(3), float("-inf"))  # blocks no row sees
        thr = selection.skip.log_threshold
        if isinstance(thr, torch.Tensor):
            thr = thr.to(tile_max.device, torch.float32).view(1, hq, 1, 1, 1)
        return negligible_rows(tile_max, thr).all(3) & (tile_max > float("-inf")).any(3) & listed


def attend_in_row_chunks(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
                         bounds: KeyBounds, selections: Sequence[BlockSelection]
                         ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Each selection's `[B, Hq, Lq, D]` float32 output and, for a skip rule, its skipped slots `[B, Hq, R, K]`,
    from partials computed one row chunk at a time (at most `MAX_ELEMENTS` floats): one exact pass over
    the prompt serves every selection, whatever its length."""
    if not selections or len({(s.block_q, s.block_k) for s in selections}) != 1:
        raise ValueError("give one or more selections with the same query and key blocks")
    b, hq, lq, _ = query.shape
    bq, bk, dv = selections[0].block_q, selections[0].block_k, value.shape[-1]
    per_row = b * hq * num_blocks(key.shape[2], bk) * (dv + 2)
    rows = max(bq, MAX_ELEMENTS // per_row // bq * bq)
    outs = [torch.zeros(b, hq, lq, dv, device=query.device) for _ in selections]
    skips = [torch.zeros(s.indices.shape, dtype=torch.bool, device=query.device) if s.skip is not None else None
             for s in selections]
    for r0 in range(0, lq, rows):
        r1 = min(lq, r0 + rows)
        part = BlockPartials.compute(query, key, value, scale, bounds, bk, rows=(r0, r1))
        for sel, out, skip in zip(selections, outs, skips, strict=True):
            dropped = part.skipped(sel) if skip is not None else None
            out[:, :, r0:r1] = part.attend(sel, dropped)
            if skip is not None:
                skip[:, :, part._rows(sel)] = dropped
    return list(zip(outs, skips, strict=True))
