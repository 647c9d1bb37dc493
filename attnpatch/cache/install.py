"""Installing a decode method's cache layers into a transformers cache."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.cache_utils import Cache, DynamicLayer, StaticLayer

DYNAMIC_ONLY = "the decode method's cache layer applies to DynamicLayer only"


def _replacement(layer: object, make_layer: Callable[[int], object | None], i: int) -> tuple[object | None, str]:
    """The layer to put in place of `layer` (None: keep it) and the note saying what happened."""
    if layer is None or type(layer) not in (DynamicLayer, StaticLayer):
        kind = "missing" if layer is None else type(layer).__name__
        return None, f"{kind} cache layer kept (decode methods replace DynamicLayer and StaticLayer only)"
    new = make_layer(i)
    if new is None:
        return None, "default cache layer"
    if type(layer) is DynamicLayer:
        return new, "installed"
    static = getattr(new, "static_variant", None)
    if static is None:
        why = getattr(new, "static_unsupported", DYNAMIC_ONLY)
        return None, f"StaticLayer cache layer kept ({why})"
    return static(layer.max_cache_len), "installed"


def _holds_tokens(cache: Cache) -> bool:
    """Whether `cache` holds tokens. Inside a compiled region (a compiled first step on a cache filled
    elsewhere) a layer's count is a tensor a branch cannot read: an initialized layer counts as holding."""
    if torch.compiler.is_compiling():
        return any(getattr(layer, "is_initialized", False) for layer in cache.layers)
    return cache.get_seq_length() > 0


def install_layers(cache: Cache, make_layer: Callable[[int], object | None], num_layers: int) -> list[str]:
    """Replace the empty full-attention layers of `cache` by the decode method's layers, in place.

    `make_layer(i)` returns the method's (DynamicLayer-like) layer for layer `i`, or None. A
    `DynamicLayer` is replaced by it; a `StaticLayer` (static cache, torch.compile) by
    `layer.static_variant(max_cache_len)` when the returned layer offers one, else it is kept and the
    note gives the layer's `static_unsupported` reason. Returns, per layer, what happened
    ("installed" or why the default layer was kept). Only an empty cache is changed, so an ongoing
    generation is never altered midway.
    """
    if _holds_tokens(cache):
        return ["cache already holds tokens: kept as is"] * num_layers
    if not cache.layers and getattr(cache, "layer_class_to_replicate", None) is DynamicLayer:
        cache.layers = [DynamicLayer() for _ in range(num_layers)]
        cache.layer_class_to_replicate = None
    notes = []
    for i in range(num_layers):
        layer = cache.layers[i] if i < len(cache.layers) else None
        new, note = _replacement(layer, make_layer, i)
        if new is not None:
            cache.layers[i] = new
        notes.append(note)
    return notes
