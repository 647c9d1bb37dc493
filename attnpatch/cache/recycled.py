"""Cache layers for Recycled Attention: the full KV cache plus, per KV head, the pages the last full
attention step found most attended (the "recycled" set) and when that step ran.

Eager steps keep that state on the host side (`RecycledState`: Python ints, tensors replaced at each
refresh). The static layer also keeps a device copy for compiled steps (`DeviceSchedule`: preallocated
tensors at static addresses, updated in place), which a CUDA graph can replay."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicLayer, StaticLayer

from attnpatch.sparsity import num_blocks


@dataclass
class DeviceSchedule:
    """Recycled Attention's state for compiled decode steps, on the cache's device: `pages`
    `[B, Hkv, K]` int32 (ascending, entries past `counts` `[B, Hkv]` unused), `refresh_at` (0-dim
    long: the cache length at the last refresh, 0 = none yet) and `steps` (0-dim long: decode steps
    since). A reset or crop zeroes `refresh_at`, so the next compiled step refreshes."""

    pages: torch.Tensor
    counts: torch.Tensor
    refresh_at: torch.Tensor
    steps: torch.Tensor

    @classmethod
    def allocate(cls, batch: int, kv_heads: int, width: int, device) -> DeviceSchedule:
        schedule = cls(torch.zeros(batch, kv_heads, width, dtype=torch.int32, device=device),
                       torch.zeros(batch, kv_heads, dtype=torch.int32, device=device),
                       torch.zeros((), dtype=torch.long, device=device),
                       torch.zeros((), dtype=torch.long, device=device))
        if not torch.compiler.is_compiling():
            for t in (schedule.pages, schedule.counts, schedule.refresh_at, schedule.steps):
                torch._dynamo.mark_static_address(t)
        return schedule

    def clear(self) -> None:
        self.refresh_at.zero_()
        self.steps.zero_()


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

    def __init__(self, page_size: int, kept_pages: int = 0):
        super().__init__()
        self.page_size, self.kept_pages = page_size, kept_pages
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
        return StaticRecycledLayer(max_cache_len, self.page_size, self.kept_pages)


class StaticRecycledLayer(RecycledState, StaticLayer):
    """A StaticLayer carrying Recycled Attention's state: on the host for eager steps
    (`RecycledState`), on the device for compiled ones (`device_schedule`, allocated with the keys;
    its page lists are `min(kept_pages, pages of the cache)` wide)."""

    def __init__(self, max_cache_len: int, page_size: int, kept_pages: int = 0, **kwargs):
        super().__init__(max_cache_len=max_cache_len)
        self.page_size, self.kept_pages = page_size, kept_pages
        self.device_schedule: DeviceSchedule | None = None
        self.host_stale = False  # compiled steps ran since the last eager one (they update the device schedule only)
        self._clear_recycled()

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        width = max(1, min(self.kept_pages, num_blocks(self.max_cache_len, self.page_size)))
        self.device_schedule = DeviceSchedule.allocate(self.batch_size, self.num_heads, width, self.device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        out = super().update(key_states, value_states, *args, **kwargs)
        if not torch.compiler.is_compiling():  # a host count; compiled steps read `cumulative_length`
            self.length += key_states.shape[-2]
        return out

    def resync_host(self) -> None:
        """The host state after compiled steps: the count from the written length, no recycled pages
        (the next eager step refreshes)."""
        refreshes = self.refreshes
        self._clear_recycled()
        self.refreshes, self.length, self.host_stale = refreshes, int(self.cumulative_length), False

    def reset(self) -> None:
        super().reset()
        self._clear_recycled()
        if self.device_schedule is not None:
            self.device_schedule.clear()

    def crop(self, tokens_to_remove: int) -> None:
        if not hasattr(StaticLayer, "crop"):
            raise NotImplementedError("this transformers version's StaticLayer cannot be cropped")
        super().crop(tokens_to_remove)
        length, refreshes = self.length - abs(tokens_to_remove), self.refreshes
        self._clear_recycled()
        self.refreshes, self.length = refreshes, length
        if self.device_schedule is not None:
            self.device_schedule.clear()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._reorder_recycled(beam_idx)
        if self.device_schedule is not None:
            self.device_schedule.clear()  # the next compiled step refreshes
