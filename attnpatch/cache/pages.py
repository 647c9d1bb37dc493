"""Per-page key bounds (Quest's metadata): the elementwise min and max of the keys of every page of
`page_size` tokens, per KV head, kept up to date by the cache layer on every `update`.

`PageBoundsLayer` is the DynamicLayer flavour (grows with the cache); `StaticPageBoundsLayer` the
StaticLayer flavour (fixed capacity, what `generate(cache_implementation="static")` and torch.compile
use; updated with tensor ops only, no host sync). Both expose `page_bounds()` ->
`(page_min, page_max, written)` with `page_min/max` `[B, Hkv, pages, D]` in the key dtype and
`written` the number of positions written (an int for the dynamic layer, a 0-d device tensor for the
static one); pages at or past `written` hold no meaning and must be masked by the reader.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer, StaticLayer

from attnpatch.sparsity import num_blocks


def key_page_bounds(key: torch.Tensor, page_size: int, length: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """`(min, max)` `[B, H, pages, D]` of `key` `[B, H, L, D]` per page of `page_size` positions,
    computed from scratch over the first `length` positions (default all; the recomputation the
    cache layers' incremental metadata must equal)."""
    b, h, n, d = key.shape
    length = n if length is None else length
    pages = num_blocks(length, page_size)
    k = key[:, :, :length]
    pad = pages * page_size - length
    hi = torch.nn.functional.pad(k, (0, 0, 0, pad), value=float("-inf")).view(b, h, pages, page_size, d)
    lo = torch.nn.functional.pad(k, (0, 0, 0, pad), value=float("inf")).view(b, h, pages, page_size, d)
    return lo.amin(3), hi.amax(3)


def _merge_into(page_min: torch.Tensor, page_max: torch.Tensor, key_states: torch.Tensor,
                positions: torch.Tensor, page_size: int) -> None:
    """Fold new keys (a chunk; one decode token goes through `_fold_token`) at `positions` (`[n]` long, consecutive,
    on the keys' device) into the page bounds, in place: a page whose first position is among them restarts from these
    keys, the page the chunk continues (its first position is earlier) keeps its previous bounds too. Fixed shapes, no
    sync."""
    b, h, n, d = key_states.shape
    page = positions // page_size
    continues = (positions[:1] % page_size) != 0  # [1]: the chunk's first page already holds keys
    first = page[:1]
    old_min = page_min.index_select(2, first)
    old_max = page_max.index_select(2, first)
    fresh = ~continues.view(1, 1, 1, 1)  # scalar fills, no host -> device copy (capturable)
    old_min = old_min.masked_fill(fresh, float("inf"))
    old_max = old_max.masked_fill(fresh, float("-inf"))
    src = key_states.to(page_min.dtype)
    index = torch.cat([first, page]).view(1, 1, n + 1, 1).expand(b, h, n + 1, d)
    page_min.scatter_reduce_(2, index, torch.cat([old_min, src], 2), "amin", include_self=False)
    page_max.scatter_reduce_(2, index, torch.cat([old_max, src], 2), "amax", include_self=False)


def _fold_token(page_min: torch.Tensor, page_max: torch.Tensor, key: torch.Tensor, position, page_size: int) -> None:
    """Fold one decode token's key `[B, H, 1, D]` at `position` into its page's bounds, in place (a page's first
    position restarts them). `position` a host int: two in-place ops on the page's slice; a 0-dim device tensor
    (a static cache's count): fixed shapes, no sync, the page rewritten with index_copy_ (kept in place under
    torch.compile, where a scatter_reduce_ into the static table became a copy of the whole table every step)."""
    src = key.to(page_min.dtype)
    page, fresh = position // page_size, position % page_size == 0
    if not isinstance(position, torch.Tensor):
        lo, hi = page_min[:, :, page:page + 1], page_max[:, :, page:page + 1]
        if fresh:
            lo.copy_(src)
            hi.copy_(src)
        else:
            torch.minimum(lo, src, out=lo)
            torch.maximum(hi, src, out=hi)
        return
    index = page.reshape(1)
    page_min.index_copy_(2, index, torch.where(fresh, src, torch.minimum(page_min.index_select(2, index), src)))
    page_max.index_copy_(2, index, torch.where(fresh, src, torch.maximum(page_max.index_select(2, index), src)))


def barrier_counters(batch: int, kv_heads: int, device: torch.device | str) -> torch.Tensor:
    """Zeroed int32 scratch (two per batch row and KV head) for a decode kernel that synchronises a KV head's
    programs (`BoundPages.counters`); the kernel leaves it at zero. A cache layer makes it once, outside any
    CUDA-graph pool."""
    return torch.zeros(2 * batch * kv_heads, dtype=torch.int32, device=device)


class PageBoundsLayer(DynamicLayer):
    """A DynamicLayer that also keeps each page's key min / max (Quest), updated incrementally: a
    prefill fills its pages, a decode token folds into the last page only (two in-place ops: eager decode
    steps are host-bound, `hf_decode --host-profile`)."""

    def __init__(self, page_size: int):
        super().__init__()
        self.page_size = page_size
        self.page_min: torch.Tensor | None = None
        self.page_max: torch.Tensor | None = None
        self.counters: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        b, h, _, d = key_states.shape
        self.page_min = key_states.new_zeros(b, h, 0, d)
        self.page_max = key_states.new_zeros(b, h, 0, d)
        self.counters = barrier_counters(b, h, key_states.device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        old = self.get_seq_length()
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        new = keys.shape[-2]
        grow = num_blocks(new, self.page_size) - self.page_min.shape[2]
        if grow > 0:
            b, h, _, d = self.page_min.shape
            self.page_min = torch.cat([self.page_min, self.page_min.new_zeros(b, h, grow, d)], 2)
            self.page_max = torch.cat([self.page_max, self.page_max.new_zeros(b, h, grow, d)], 2)
        if new - old == 1:  # a decode token: its position is known on the host, so two in-place ops
            _fold_token(self.page_min, self.page_max, key_states, old, self.page_size)
            return keys, values
        positions = torch.arange(old, new, device=keys.device)
        _merge_into(self.page_min, self.page_max, key_states, positions, self.page_size)
        return keys, values

    def page_bounds(self) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        if self.page_min is None:
            return None
        return self.page_min, self.page_max, self.get_seq_length()

    def reset(self) -> None:
        super().reset()
        self.page_min = self.page_max = None

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if self.page_min is not None and self.keys is not None:
            n = self.keys.shape[-2]
            self.page_min, self.page_max = key_page_bounds(self.keys, self.page_size, n)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.page_min is not None and self.page_min.shape[0] != 0:
            self.page_min = self.page_min.index_select(0, beam_idx.to(self.page_min.device))
            self.page_max = self.page_max.index_select(0, beam_idx.to(self.page_max.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.page_min is not None:
            self.page_min = self.page_min.repeat_interleave(repeats, dim=0)
            self.page_max = self.page_max.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.page_min is not None:
            self.page_min, self.page_max = self.page_min[indices], self.page_max[indices]

    def static_variant(self, max_cache_len: int) -> StaticPageBoundsLayer:
        """The same metadata on a StaticLayer of `max_cache_len` positions (what `install_layers`
        puts in place of a static cache's layer)."""
        return StaticPageBoundsLayer(max_cache_len, self.page_size)


class StaticPageBoundsLayer(StaticLayer):
    """A StaticLayer that also keeps each page's key min / max in preallocated `[B, Hkv, pages, D]`
    tensors (static addresses, updated in place by tensor ops: usable under torch.compile / CUDA
    graphs). Pages past the written length hold stale or zero values: readers mask them."""

    def __init__(self, max_cache_len: int, page_size: int, **kwargs):
        super().__init__(max_cache_len=max_cache_len)
        self.page_size = page_size
        self.page_min: torch.Tensor | None = None
        self.page_max: torch.Tensor | None = None
        self.counters: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        shape = (self.batch_size, self.num_heads, num_blocks(self.max_cache_len, self.page_size), self.k_head_dim)
        self.page_min = torch.zeros(shape, dtype=key_states.dtype, device=self.device)
        self.page_max = torch.zeros(shape, dtype=key_states.dtype, device=self.device)
        self.counters = barrier_counters(self.batch_size, self.num_heads, self.device)
        if not torch.compiler.is_compiling():
            for t in (self.page_min, self.page_max, self.counters):
                torch._dynamo.mark_static_address(t)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[-2] == 1:  # a decode token at the written count (before `update` advances it)
            _fold_token(self.page_min, self.page_max, key_states, self.cumulative_length, self.page_size)
            return super().update(key_states, value_states, *args, **kwargs)
        positions = torch.arange(key_states.shape[-2], device=self.device) + self.cumulative_length
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        _merge_into(self.page_min, self.page_max, key_states, positions, self.page_size)
        return keys, values

    def page_bounds(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        if not self.is_initialized:
            return None
        return self.page_min, self.page_max, self.cumulative_length

    def reset(self) -> None:
        super().reset()
        if self.page_min is not None:
            self.page_min.zero_()
            self.page_max.zero_()

    def crop(self, tokens_to_remove: int) -> None:
        if not hasattr(StaticLayer, "crop"):
            raise NotImplementedError("this transformers version's StaticLayer cannot be cropped")
        super().crop(tokens_to_remove)
        if self.page_min is not None:  # the last page may now be partial: recompute it (rare; one sync)
            n = int(self.cumulative_length)
            if n % self.page_size:
                p = n // self.page_size
                lo, hi = key_page_bounds(self.keys[:, :, p * self.page_size: n], self.page_size)
                self.page_min[:, :, p: p + 1].copy_(lo)
                self.page_max[:, :, p: p + 1].copy_(hi)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.page_min is not None:
            self.page_min.copy_(self.page_min.index_select(0, beam_idx.to(self.device)))
            self.page_max.copy_(self.page_max.index_select(0, beam_idx.to(self.device)))
