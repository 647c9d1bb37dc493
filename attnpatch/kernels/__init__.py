"""Executors: compute attention over a selection. They know nothing of methods."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from attnpatch.kernels.reference import block_sparse_attention, paged_decode_attention

BACKENDS = ("auto", "reference")


@dataclass(frozen=True)
class Executors:
    """The executor pair a patch uses: block-sparse prefill and paged decode."""

    name: str
    prefill: Callable
    decode: Callable


def get_executors(backend: str = "auto") -> Executors:
    """Resolve a backend name; ValueError names the allowed ones."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    return Executors("reference", block_sparse_attention, paged_decode_attention)
