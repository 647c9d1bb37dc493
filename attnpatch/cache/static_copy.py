"""Copying what a dynamic cache holds into a static (preallocated, compileable) one."""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, StaticCache


def static_copy(cache: Cache, config: Any, max_cache_len: int) -> StaticCache:
    """A `StaticCache` of `max_cache_len` slots per layer holding the tokens of `cache`, in the same order
    and at the same cache positions (`generate` continues from it as from `cache`; its decode steps are
    fixed-shape, so transformers compiles them on CUDA, and `torch.compile` replays them).

    Every layer of `cache` must hold the same number of tokens, with keys and values; sliding-window
    caches (whose layers hold fewer) are refused, as is a `max_cache_len` below the tokens held."""
    layers = getattr(cache, "layers", None)
    if not layers:
        raise ValueError("static_copy needs a cache with layers (transformers >= 5 Cache)")
    held = {int(layer.keys.shape[-2]) if isinstance(getattr(layer, "keys", None), torch.Tensor) else -1
            for layer in layers}
    if len(held) != 1 or -1 in held:
        raise ValueError(f"static_copy needs every layer to hold the same tokens with keys and values; "
                         f"layers hold {sorted(held)} tokens (-1: empty)")
    tokens = held.pop()
    if max_cache_len < tokens:
        raise ValueError(f"max_cache_len {max_cache_len} is below the {tokens} tokens the cache holds")
    static = StaticCache(config=config, max_cache_len=max_cache_len)
    if len(static.layers) != len(layers):
        raise ValueError(f"the config makes {len(static.layers)} cache layers, the cache has {len(layers)}")
    if any(getattr(layer, "is_sliding", False) for layer in static.layers):
        raise ValueError("static_copy does not take sliding-window layers (they keep a window, not every token)")
    for i, layer in enumerate(layers):
        static.update(layer.keys, layer.values, i)
    return static
