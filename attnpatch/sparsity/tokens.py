"""Token-level helpers for methods that return a `TokenSelection` (AnchorAttention, S2O): which key
positions some query of a block may see (causal, sliding window, padding), the forced sink / local
keys, compacting a boolean position mask into ascending lists, clipping lists to what is visible, and
a `TokenSelection` whose density counts (query, key) pairs exactly.

Query blocks are in query-index space (block `r` holds queries `r·Bq .. (r+1)·Bq − 1`), queries aligned
to the end of the keys (query `i` sits at position `Lk − Lq + i`), as everywhere in `attnpatch.sparsity`.
With a tensor mask (`bounds.mask`) only the causal rule, the first real key and the window (if any)
are used here; the executor applies the mask per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnpatch.sparsity.bounds import KeyBounds
from attnpatch.sparsity.regions import query_block_span
from attnpatch.sparsity.selection import TokenSelection, num_blocks

_PAIRS_CHUNK = 1 << 24  # list slots per slice when counting pairs


def closed_bounds(bounds: KeyBounds, batch: int, device) -> KeyBounds:
    """`bounds` itself when it is in closed form, else its closed part: first real key and window."""
    if bounds.mask is None:
        return bounds
    return KeyBounds(key_start=bounds.first_key(batch, device), window=bounds.window)


def block_rows(q_len: int, kv_len: int, block_q: int, r0: int = 0, r1: int | None = None, device=None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """`[n]` absolute positions of the first and last query of query blocks `r0 .. r1 − 1` (int64)."""
    first, last = query_block_span(q_len, kv_len, block_q, device)
    return first[r0:r1], last[r0:r1]


def visible_to_block(bounds: KeyBounds, batch: int, q_len: int, kv_len: int, block_q: int, kpos: torch.Tensor,
                     r0: int = 0) -> torch.Tensor:
    """Whether some query of its block may see each key position: `kpos` `[B|1, H|1, n, K]` (int64) holds
    positions for query blocks `r0 .. r0 + n − 1`; returns a bool tensor of the broadcast shape.

    The query of the block that sees key `p` best is the first one at or after it, `clamp(p, first, last)`:
    `p` is visible iff that query may see it (causal, window, padding)."""
    n = kpos.shape[-2]
    first, last = block_rows(q_len, kv_len, block_q, r0, r0 + n, kpos.device)
    q_best = torch.minimum(torch.maximum(kpos, first.view(1, 1, n, 1)), last.view(1, 1, n, 1))
    ok = closed_bounds(bounds, batch, kpos.device).visible(q_best, kpos, batch)
    return ok & (kpos >= 0) & (kpos < kv_len)


def block_key_mask(bounds: KeyBounds, batch: int, q_len: int, kv_len: int, block_q: int, r0: int, r1: int,
                   keys: int | None = None, device=None) -> torch.Tensor:
    """`[B|1, 1, r1 − r0, keys]` bool: the keys `0 .. keys − 1` (default all) some query of each block may
    see. O((r1 − r0) · keys): callers chunk over query blocks."""
    kpos = torch.arange(kv_len if keys is None else keys, device=device).view(1, 1, 1, -1)
    kpos = kpos.expand(1, 1, r1 - r0, kpos.shape[-1])
    return visible_to_block(bounds, batch, q_len, kv_len, block_q, kpos, r0)


def real_keys(bounds: KeyBounds, batch: int, kv_len: int, device=None) -> torch.Tensor | None:
    """`[B, Lk]` bool: keys that are not padding (None when there is no padding)."""
    if not bounds.has_padding and bounds.mask is None:
        return None
    pos = torch.arange(kv_len, device=device).view(1, -1)
    ok = pos >= bounds.first_key(batch, device).view(-1, 1)
    if bounds.key_valid is not None:
        ok = ok & bounds.key_valid.to(device)
    return ok


def forced_key_mask(bounds: KeyBounds, batch: int, q_len: int, kv_len: int, block_q: int, r0: int, r1: int,
                    sink_tokens: int, local_tokens: int, keys: int | None = None, device=None) -> torch.Tensor:
    """`[B|1, 1, r1 − r0, keys]` bool: the sink (`sink_tokens` keys from each row's first real key, never a
    window's start) and the local band (the `local_tokens` keys before the block's first query, and the
    block's own keys up to its last query), limited to what some query of the block may see."""
    width = kv_len if keys is None else keys
    kpos = torch.arange(width, device=device).view(1, 1, 1, -1)
    first, last = block_rows(q_len, kv_len, block_q, r0, r1, device)
    local = (kpos > first.view(1, 1, -1, 1) - 1 - local_tokens) & (kpos <= last.view(1, 1, -1, 1))
    start = bounds.first_key(batch, device).view(-1, 1, 1, 1)
    sink = (kpos >= start) & (kpos < start + sink_tokens)
    return (local | sink) & block_key_mask(bounds, batch, q_len, kv_len, block_q, r0, r1, width, device)


def compact_mask(mask: torch.Tensor, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`(positions int32 [..., W], counts int32 [...])`: the ascending positions of the True entries of
    each row of `mask` `[..., L]`. `W` is `width` (entries past it are dropped, keep counts ≤ W) or the
    largest count (one host sync). Slots past a row's count hold 0. Memory O(mask)."""
    length = mask.shape[-1]
    inclusive = mask.cumsum(-1, dtype=torch.int32)
    counts = inclusive[..., -1] if length else torch.zeros(mask.shape[:-1], dtype=torch.int32, device=mask.device)
    if width is None:
        width = int(counts.max()) if counts.numel() else 0
    counts = counts.clamp(max=width)
    slot = torch.where(mask & (inclusive <= width), inclusive - 1, width).long()
    out = torch.zeros(*mask.shape[:-1], width + 1, dtype=torch.int32, device=mask.device)
    src = torch.arange(length, dtype=torch.int32, device=mask.device).expand(mask.shape)
    out.scatter_(-1, slot, src)  # every unkept entry lands in the spare last slot
    return out[..., :width], counts


def pad_lists(parts: list[tuple[torch.Tensor, torch.Tensor]], dim: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate `(positions [..., n_i, W_i], counts [..., n_i])` chunks along the query-block dim,
    zero-padding every chunk's lists to the widest (at least 1)."""
    width = max([1] + [p.shape[-1] for p, _ in parts])
    idx = torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[-1])) for p, _ in parts], dim=dim)
    return idx, torch.cat([c for _, c in parts], dim=dim)


def clip_lists(indices: torch.Tensor, counts: torch.Tensor, bounds: KeyBounds, q_len: int, kv_len: int,
               block_q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop listed positions no query of their block may see (padding, window, causal, out of range) and
    re-compact: `(indices, counts)` with the same (or a smaller) width. Lists stay ascending."""
    b = counts.shape[0]
    listed = torch.arange(indices.shape[-1], device=indices.device) < counts.unsqueeze(-1)
    keep = listed & visible_to_block(bounds, b, q_len, kv_len, block_q, indices.long())
    slot = torch.where(keep, keep.cumsum(-1) - 1, indices.shape[-1])
    out = torch.zeros(*indices.shape[:-1], indices.shape[-1] + 1, dtype=torch.int32, device=indices.device)
    out.scatter_(-1, slot, indices.to(torch.int32))
    new_counts = keep.sum(-1, dtype=torch.int32)
    width = max(int(new_counts.max()) if new_counts.numel() else 0, 1)
    return out[..., :width].contiguous(), new_counts


def visible_pairs(indices: torch.Tensor, counts: torch.Tensor, block_q: int, q_len: int, kv_len: int
                  ) -> torch.Tensor:
    """`[B, H]` float64: the (query, key) pairs of a token selection that the causal rule lets compute —
    key `p` of block `r` counts once for every query of the block at or after it."""
    b, h, r, k = indices.shape
    first, last = block_rows(q_len, kv_len, block_q, 0, r, indices.device)
    slots = torch.arange(k, device=indices.device)
    out = torch.zeros(b, h, dtype=torch.float64, device=indices.device)
    step = max(1, _PAIRS_CHUNK // max(1, b * h * k))  # query blocks per slice: temporaries stay small
    for r0 in range(0, r, step):
        r1 = min(r, r0 + step)
        p = indices[:, :, r0:r1].long()
        rows = (last[r0:r1].view(1, 1, -1, 1) - torch.maximum(p, first[r0:r1].view(1, 1, -1, 1)) + 1).clamp_(min=0)
        rows.masked_fill_(slots >= counts[:, :, r0:r1].unsqueeze(-1), 0)
        out += rows.sum(dim=(2, 3), dtype=torch.float64)
    return out


@dataclass(frozen=True)
class CountedTokenSelection(TokenSelection):
    """A `TokenSelection` whose density counts exactly the (query, key) pairs the causal rule lets its
    lists compute (the base class counts every listed key once per row of its block, an upper bound
    that exceeds 1 at full density). Executors see a plain `TokenSelection`."""

    def kept_and_total(self) -> tuple[torch.Tensor, torch.Tensor]:
        kept = visible_pairs(self.indices, self.counts, self.block_q, self.q_len, self.kv_len).sum(0)
        _, total = super().kept_and_total()
        return kept, total.to(kept.device)


def validate_tokens(sel: TokenSelection) -> None:
    """Raise ValueError unless every list is strictly ascending, in `[0, Lk)` and causally reachable from
    its block (tests and debugging; reads the whole selection)."""
    b, h, r, k = sel.indices.shape
    if tuple(sel.counts.shape) != (b, h, r) or r != num_blocks(sel.q_len, sel.block_q):
        raise ValueError(f"selection shape {tuple(sel.indices.shape)} / counts {tuple(sel.counts.shape)} "
                         f"do not match q_len={sel.q_len} with block {sel.block_q}")
    if bool((sel.counts < 0).any()) or bool((sel.counts > k).any()):
        raise ValueError(f"counts must lie in [0, {k}]")
    listed = torch.arange(k, device=sel.indices.device) < sel.counts.unsqueeze(-1)
    _, last = block_rows(sel.q_len, sel.kv_len, sel.block_q, 0, r, sel.indices.device)
    p = sel.indices.long()
    if bool((listed & ((p < 0) | (p > last.view(1, 1, r, 1)))).any()):
        raise ValueError("a listed key is negative or after the last query of its block")
    if k > 1 and bool((listed[..., 1:] & (p[..., 1:] <= p[..., :-1])).any()):
        raise ValueError("key positions of a query block must be strictly ascending (no duplicates)")
