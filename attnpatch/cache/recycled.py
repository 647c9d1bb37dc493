"""Cache layers for Recycled Attention: the full KV cache plus, per KV head, the pages the last full
attention step found most attended (the "recycled" set) and when that step ran."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer, StaticLayer


class RecycledState:
    """What a recycled-attention layer remembers between decode steps (per layer, per generation).

    `pages` `[B, Hkv, K]` (long, ascending, entries past `counts` `[B, Hkv]` unused) are the pages the
    last refresh chose; `refresh_length` the cache length at that refresh (tokens at or past it were
    generated since), `steps_since_refresh` the decode steps since, `refreshes` how many ran.
    `length` is the number of positions written, kept as a host int (the static layer's own counter
    is a device tensor).
    """

    page_size: int

    def _clear_recycled(self) -> None:
        self.pages: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None
        self.refresh_length = 0
        self.steps_since_refresh = 0
        self.refreshes = 0
        self.length = 0

    def record_refresh(self, pages: torch.Tensor, counts: torch.Tensor, length: int) -> None:
        self.pages, self.counts = pages, counts
        self.refresh_length, self.steps_since_refresh = length, 0
        self.refreshes += 1

    def _reorder_recycled(self, index: torch.Tensor) -> None:
        if self.pages is not None:
            self.pages = self.pages.index_select(0, index.to(self.pages.device))
            self.counts = self.counts.index_select(0, index.to(self.counts.device))


class RecycledLayer(RecycledState, DynamicLayer):
    """A DynamicLayer carrying Recycled Attention's state (`RecycledState`)."""

    def __init__(self, page_size: int):
        super().__init__()
        self.page_size = page_size
        self._clear_recycled()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        out = super().update(key_states, value_states, *args, **kwargs)
        self.length = out[0].shape[-2]
        return out

    def reset(self) -> None:
        super().reset()
        self._clear_recycled()

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        refreshes = self.refreshes
        self._clear_recycled()  # the next step refreshes
        self.refreshes, self.length = refreshes, self.get_seq_length()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._reorder_recycled(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.pages is not None:
            self.pages = self.pages.repeat_interleave(repeats, dim=0)
            self.counts = self.counts.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.pages is not None:
            self.pages, self.counts = self.pages[indices], self.counts[indices]

    def static_variant(self, max_cache_len: int) -> StaticRecycledLayer:
        return StaticRecycledLayer(max_cache_len, self.page_size)


class StaticRecycledLayer(RecycledState, StaticLayer):
    """A StaticLayer carrying Recycled Attention's state (eager generation: the refresh schedule
    is decided on the host)."""

    def __init__(self, max_cache_len: int, page_size: int, **kwargs):
        super().__init__(max_cache_len=max_cache_len)
        self.page_size = page_size
        self._clear_recycled()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        out = super().update(key_states, value_states, *args, **kwargs)
        self.length += key_states.shape[-2]
        return out

    def reset(self) -> None:
        super().reset()
        self._clear_recycled()

    def crop(self, tokens_to_remove: int) -> None:
        if not hasattr(StaticLayer, "crop"):
            raise NotImplementedError("this transformers version's StaticLayer cannot be cropped")
        super().crop(tokens_to_remove)
        length, refreshes = self.length - abs(tokens_to_remove), self.refreshes
        self._clear_recycled()
        self.refreshes, self.length = refreshes, length

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._reorder_recycled(beam_idx)
