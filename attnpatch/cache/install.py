"""Installing a decode method's cache layers into a transformers cache."""

from __future__ import annotations

from collections.abc import Callable

from transformers.cache_utils import Cache, DynamicLayer


def install_layers(cache: Cache, make_layer: Callable[[int], object | None], num_layers: int) -> list[str]:
    """Replace the empty full-attention layers of `cache` by the decode method's layers, in place.

    Returns, per layer, what happened ("installed" or why the default layer was kept). Only an
    empty cache is changed, so an ongoing generation is never altered midway.
    """
    if cache.get_seq_length() > 0:
        return ["cache already holds tokens: kept as is"] * num_layers
    if not cache.layers and getattr(cache, "layer_class_to_replicate", None) is DynamicLayer:
        cache.layers = [DynamicLayer() for _ in range(num_layers)]
        cache.layer_class_to_replicate = None
    notes = []
    for i in range(num_layers):
        layer = cache.layers[i] if i < len(cache.layers) else None
        if layer is None or type(layer) is not DynamicLayer:
            kind = "missing" if layer is None else type(layer).__name__
            notes.append(f"{kind} cache layer kept (decode method applies to DynamicLayer only)")
            continue
        new = make_layer(i)
        if new is None:
            notes.append("default cache layer")
        else:
            cache.layers[i] = new
            notes.append("installed")
    return notes
