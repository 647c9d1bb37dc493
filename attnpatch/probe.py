"""Probes: observers that see every attention call of a patched model — dense ones included — with
the real Q/K/V the layer received, what it computed and how. Calibration and fidelity attach here
(`Patch.observe(fn)`); with no observer registered nothing is recorded."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from attnpatch.sparsity import BlockSelection, KeyBounds, PageSelection, TokenSelection


@dataclass(frozen=True)
class AttentionCall:
    """One attention call: layer, phase ("prefill" or "decode"), inputs, output `[B, Hq, Lq, Dv]`,
    softmax scale, key bounds (padding, window), the selection that ran (None: dense), the method
    and the backend that ran it ("sdpa" for transformers' own dense path)."""

    layer: int
    phase: str
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    output: torch.Tensor
    scale: float
    bounds: KeyBounds
    selection: BlockSelection | TokenSelection | PageSelection | None
    method: str
    backend: str

    @property
    def is_dense(self) -> bool:
        return self.selection is None


Observer = Callable[[AttentionCall], None]


class ObserverHandle:
    """Returned by `Patch.observe`; `remove()` detaches the observer (also a context manager)."""

    def __init__(self, observers: list[Observer], fn: Observer):
        self._observers, self._fn = observers, fn

    def remove(self) -> None:
        if self._fn in self._observers:
            self._observers.remove(self._fn)

    def __enter__(self) -> ObserverHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
