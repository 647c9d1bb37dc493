"""The two kinds of method and their single override points."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch

from attnpatch.sparsity import BlockSelection, PageSelection


class DenseFallback(NamedTuple):
    """Returned by `select` when the method declines an input; the layer then runs dense attention."""

    reason: str


@dataclass(frozen=True)
class PrefillContext:
    """What a prefill method may look at besides Q and K."""

    layer_idx: int
    scale: float
    key_start: torch.Tensor | None  # [B] first non-padding key of each row (None: no padding)
    sliding_window: int | None  # the layer's window, if it is a sliding-window layer


@dataclass(frozen=True)
class DecodeContext:
    """What a decode method may look at besides the query and the cached keys."""

    layer_idx: int
    scale: float


@dataclass
class PrefillMethod:
    """Base of prefill methods: decide which key blocks each query block computes."""

    name: ClassVar[str] = ""

    def select(self, query: torch.Tensor, key: torch.Tensor, ctx: PrefillContext) -> BlockSelection | DenseFallback:
        """The override point. query `[B, Hq, Lq, D]`, key `[B, Hkv, Lk, D]` (post-RoPE, with the cache)."""
        raise NotImplementedError

    @property
    def is_dense(self) -> bool:
        return False


@dataclass
class DecodeMethod:
    """Base of decode methods: what the KV cache keeps (`cache_layer`) and what each step reads (`select`).

    A method overrides one of the two.
    """

    name: ClassVar[str] = ""

    def select(self, query: torch.Tensor, key: torch.Tensor, ctx: DecodeContext) -> PageSelection | None:
        """Which cached pages one decode step reads (None: all of them, through SDPA).

        query `[B, Hq, 1, D]`, key `[B, Hkv, L, D]` as stored by the cache.
        """
        return None

    def cache_layer(self, layer_idx: int, config: Any, on_update=None):
        """The override point: a transformers cache layer for a full-attention layer, or None for the default.

        `on_update(layer_idx, positions)` must be called by a layer whose returned keys are not the
        contiguous positions `0..L-1`, with the original position of every returned key.
        """
        return None

    @property
    def is_dense(self) -> bool:
        return False

    @property
    def keeps_own_cache(self) -> bool:
        """Whether the method overrides `cache_layer` (so a patch must install its cache layers)."""
        return type(self).cache_layer is not DecodeMethod.cache_layer
