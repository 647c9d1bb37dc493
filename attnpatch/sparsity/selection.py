"""Sparsity as data: which key blocks each query block attends to."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def num_blocks(length: int, block: int) -> int:
    """Number of blocks of size `block` needed to cover `length` positions."""
    return (length + block - 1) // block


def causal_block_limit(q_len: int, kv_len: int, block_q: int, block_k: int, device=None) -> torch.Tensor:
    """For every query block, the number of key blocks it may see under the causal mask.

    Query `i` sits at absolute position `kv_len - q_len + i` (chunked prefill aligns queries to the
    end of the keys), so query block `r` sees key blocks `0 .. limit[r] - 1`.
    """
    offset = kv_len - q_len
    last_q = torch.clamp((torch.arange(num_blocks(q_len, block_q), device=device) + 1) * block_q, max=q_len) - 1
    return (offset + last_q) // block_k + 1


@dataclass(frozen=True)
class SkipRule:
    """BLASST's early skip: a visited tile is skipped (no exp, no P·V) when, for every row of the tile,
    `tile_row_max - running_row_max < log_threshold`, both in *scaled* natural-log scores (σ·q·k).

    This is the one convention of the skip bound everywhere (methods, backends, kernels): a method
    thresholding λ on scaled scores passes ln λ; one reproducing the raw-score convention
    (differences of unscaled q·k compared with ln λ) passes σ·ln λ. A float, or a `[Hq]` tensor
    (per query head); `-inf` never skips. Tiles are visited in ascending key order, so the sink tile
    sets the running max.
    """

    log_threshold: float | torch.Tensor


@dataclass(frozen=True)
class BlockSelection:
    """Per (batch, query head, query block) the key blocks to compute, in ascending order.

    `indices[b, h, r, :counts[b, h, r]]` are the key blocks of query block `r`; entries past the
    count are ignored. Queries are aligned to the end of the keys (causal offset `kv_len - q_len`);
    the causal mask inside the diagonal block is the executor's job, not the selection's.
    """

    indices: torch.Tensor  # int32 [B, H, R, K]
    counts: torch.Tensor  # int32 [B, H, R]
    block_q: int
    block_k: int
    q_len: int
    kv_len: int
    skip: SkipRule | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.counts.shape)  # type: ignore[return-value]

    @classmethod
    def causal(cls, batch: int, heads: int, q_len: int, kv_len: int, block_q: int, block_k: int,
               device=None, skip: SkipRule | None = None) -> BlockSelection:
        """Every causally valid block, without memory: stride-0 views of one `arange`."""
        r, c = num_blocks(q_len, block_q), num_blocks(kv_len, block_k)
        idx = torch.arange(c, dtype=torch.int32, device=device).expand(batch, heads, r, c)
        counts = causal_block_limit(q_len, kv_len, block_q, block_k, device).to(torch.int32).expand(batch, heads, r)
        return cls(idx, counts, block_q, block_k, q_len, kv_len, skip)

    @classmethod
    def from_block_mask(cls, mask: torch.Tensor, block_q: int, block_k: int, q_len: int, kv_len: int) -> BlockSelection:
        """Build from a boolean `[B, H, R, C]` block mask (small: R×C blocks, never tokens)."""
        if mask.dim() != 4:
            raise ValueError(f"block mask must be 4D [B, H, R, C], got shape {tuple(mask.shape)}")
        c = mask.shape[-1]
        counts = mask.sum(-1, dtype=torch.int32)
        k = max(int(counts.max().item()) if counts.numel() else 0, 1)
        # Each kept column goes to its slot among the kept ones (a running count: ascending, no sort); the
        # others to a spare slot k, dropped. Slots past a row's count hold 0.
        slot = torch.where(mask, mask.cumsum(-1, dtype=torch.int32) - 1, k).long()
        cols = torch.arange(c, dtype=torch.int32, device=mask.device).expand(mask.shape)
        order = torch.zeros(*mask.shape[:-1], k + 1, dtype=torch.int32, device=mask.device).scatter_(-1, slot, cols)
        return cls(order[..., :k].contiguous(), counts, block_q, block_k, q_len, kv_len)

    def to_block_mask(self) -> torch.Tensor:
        """Boolean `[B, H, R, C]` block mask (tests, plots, the reference backend's CPU path; R×C blocks)."""
        c = num_blocks(self.kv_len, self.block_k)
        b, h, r, k = self.indices.shape
        valid = torch.arange(k, device=self.indices.device) < self.counts.unsqueeze(-1)
        mask = torch.zeros(b, h, r, c + 1, dtype=torch.bool, device=self.indices.device)
        idx = torch.where(valid, self.indices.long(), c)
        mask.scatter_(-1, idx, True)
        return mask[..., :c]

    def causal_pairs(self) -> torch.Tensor:
        """Number of causally valid (query block, key block) pairs per query block `[R]`."""
        return causal_block_limit(self.q_len, self.kv_len, self.block_q, self.block_k, self.counts.device)

    def kept_and_total(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`([H] kept block pairs, [H] causally valid block pairs)`, summed over the batch (float64):
        the one place density is counted (stats, fidelity, benchmarks)."""
        kept = self.counts.sum(dim=(0, 2), dtype=torch.float64)
        total = self.causal_pairs().sum().to(torch.float64) * self.counts.shape[0]
        return kept, total.expand_as(kept)

    def density_per_head(self) -> torch.Tensor:
        """Computed / causally valid block pairs, averaged over the batch: `[H]` float."""
        kept, total = self.kept_and_total()
        return (kept / total).float()

    def validate(self) -> None:
        """Raise ValueError if indices are out of range, unsorted, duplicated or beyond the causal limit."""
        b, h, r, k = self.indices.shape
        if tuple(self.counts.shape) != (b, h, r):
            raise ValueError(f"counts shape {tuple(self.counts.shape)} does not match indices {(b, h, r)}")
        if r != num_blocks(self.q_len, self.block_q):
            raise ValueError(f"{r} query blocks given, q_len={self.q_len} with block {self.block_q} "
                             f"needs {num_blocks(self.q_len, self.block_q)}")
        if bool((self.counts < 0).any()) or bool((self.counts > k).any()):
            raise ValueError(f"counts must lie in [0, {k}]")
        valid = torch.arange(k, device=self.indices.device) < self.counts.unsqueeze(-1)
        limit = self.causal_pairs().view(1, 1, r, 1)
        idx = self.indices.long()
        if bool((valid & ((idx < 0) | (idx >= limit))).any()):
            raise ValueError("a selected key block is negative or beyond the causal limit of its query block")
        if k > 1:
            step = idx[..., 1:] - idx[..., :-1]
            if bool((valid[..., 1:] & (step <= 0)).any()):
                raise ValueError("key blocks of a query block must be strictly ascending (no duplicates)")


@dataclass(frozen=True)
class TokenSelection:
    """Per (batch, query head, query block) an ascending list of key *positions* (token granularity).

    For stripe / permutation methods (AnchorAttention, S2O style). `indices[b, h, r, :counts[b, h, r]]`
    are key positions in `[0, kv_len)`; queries are aligned to the end of the keys and the executor
    applies the causal rule per token.
    """

    indices: torch.Tensor  # int32 [B, H, R, K]
    counts: torch.Tensor  # int32 [B, H, R]
    block_q: int
    q_len: int
    kv_len: int

    def kept_and_total(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`([H] kept (query, key) pairs, [H] causally valid pairs)` summed over the batch (float64),
        counting every listed key once per row of its query block (an upper bound near the diagonal)."""
        rows = torch.bincount(torch.arange(self.q_len, device=self.counts.device) // self.block_q,
                              minlength=self.counts.shape[-1]).to(torch.float64)
        kept = (self.counts.to(torch.float64) * rows).sum(dim=(0, 2))
        visible = (torch.arange(self.q_len, dtype=torch.float64) + self.kv_len - self.q_len + 1).sum()
        return kept, (visible * self.counts.shape[0]).to(kept.device).expand_as(kept)


@dataclass(frozen=True)
class PageSelection:
    """Decode: per (batch, KV head) an ascending list of KV pages of `page_size` tokens.

    All query heads of a KV head's group read the same pages (what bounds decode memory traffic).
    `indices[b, g, :counts[b, g]]` are page numbers; positions `>= kv_len` are masked.
    """

    indices: torch.Tensor  # int32 [B, Hkv, P]
    counts: torch.Tensor  # int32 [B, Hkv]
    page_size: int
    kv_len: int
    skip: SkipRule | None = None  # tiles are pages; the G query heads of a KV head skip jointly
    # The lists hold no page at or past the cache's written length (the method masked them itself, e.g.
    # Quest from its cache layer's count): a clip to the static cache's written keys would change nothing.
    within_written: bool = False

    @classmethod
    def all_pages(cls, batch: int, kv_heads: int, kv_len: int, page_size: int, device=None,
                  skip: SkipRule | None = None, key_end: torch.Tensor | None = None) -> PageSelection:
        """Every page of `kv_len` keys; with `key_end` (`[B]` int: the keys a static cache has written)
        only the pages before it (what `clipped` would leave, in fewer tensor ops)."""
        n = num_blocks(kv_len, page_size)
        idx = torch.arange(n, dtype=torch.int32, device=device).expand(batch, kv_heads, n)
        if key_end is None:
            counts = torch.full((batch, kv_heads), n, dtype=torch.int32, device=device)
        else:
            written = (key_end.to(idx.device, torch.int64) + page_size - 1) // page_size
            counts = written.clamp(0, n).to(torch.int32).view(-1, 1).expand(batch, kv_heads)
        return cls(idx, counts, page_size, kv_len, skip, within_written=key_end is not None)

    def clipped(self, key_end: torch.Tensor) -> PageSelection:
        """The same lists without the pages that start at or past `key_end[b]` (`[B]` int: the keys a
        static cache has written), so they are never read; counts change on device, no host sync."""
        limit = (key_end.to(self.indices.device, torch.int64) + self.page_size - 1) // self.page_size
        listed = torch.arange(self.indices.shape[-1], device=self.indices.device) < self.counts.unsqueeze(-1)
        keep = listed & (self.indices < limit.view(-1, 1, 1))  # ascending lists: a prefix of each
        counts = keep.sum(-1, dtype=torch.int32)
        return PageSelection(self.indices, counts, self.page_size, self.kv_len, self.skip)


@dataclass
class BoundPages:
    """Decode: the `k` pages per (batch, KV head) with the largest page bounds of this step's query (Quest's
    selection), described rather than made, so that a decode backend can make it in the launch that attends
    (`Backend.decode_bound`). The selection: the bound of page `p` for query head `h` is
    `scale · Σ_d max(q_d·min_{p,d}, q_d·max_{p,d})`; a KV head's query heads combine them by `combine`
    ("softmax_sum": each head's bounds softmaxed over the valid pages, summed; "max"); valid pages are
    `first[b] <= p < end[b]`; `first[b]` and the `keep_last + 1` last valid pages are always kept; the
    lists are ascending (what `group_topk_ascending_triton` makes from `page_upper_bounds_triton`)."""

    query: torch.Tensor  # [B, Hq, 1, D]
    page_min: torch.Tensor  # [B, Hkv, >= n_pages, D], the keys' dtype
    page_max: torch.Tensor
    n_pages: int
    k: int  # pages per list
    first: torch.Tensor  # [B] each row's first page (its first real key's)
    end: torch.Tensor  # 0-dim or [B]: the pages written
    keep_last: int
    combine: str
    page_size: int
    kv_len: int
    scale: float  # of the bounds: the attention's softmax scale
    # int32 zeros, >= 2·B·Hkv, that a one-launch backend may use as barrier counters and leaves at zero; held by
    # the cache layer so that they outlive a CUDA-graph pool (a buffer first made inside one is refused there)
    counters: torch.Tensor | None = None
