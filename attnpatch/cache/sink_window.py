"""Cache layers for decode methods, and their installation into transformers' caches."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.cache_utils import Cache, DynamicLayer

PositionSink = Callable[[int, torch.Tensor], None]


class SinkWindowLayer(DynamicLayer):
    """Keeps the first `n_sink` and the last `window` tokens of a layer; evicts everything between.

    Keys keep the RoPE positions they were computed at (no re-rotation): attention runs over
    sinks + window at their original positions, which stays inside the trained range for
    contexts up to the model's window. `update` returns the previously stored tokens plus the new
    ones (so a prefill chunk still sees itself whole), then trims what is stored; the stored size
    never exceeds `n_sink + window`. The layer reports to transformers the *virtual* length (all
    tokens seen), so positions and masks are built as for a full cache; the attention function
    then picks the mask columns of the tokens actually returned (published through `on_update`).
    """

    is_sliding = False
    is_croppable = False

    def __init__(self, n_sink: int, window: int, layer_idx: int, on_update: PositionSink | None = None):
        super().__init__()
        self.n_sink, self.window, self.layer_idx = n_sink, window, layer_idx
        self.on_update = on_update
        self.cumulative_length = 0
        self.positions: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.positions = torch.zeros(0, dtype=torch.long, device=self.device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        new_pos = torch.arange(self.cumulative_length, self.cumulative_length + new, device=self.device)
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        positions = torch.cat([self.positions, new_pos])
        self.cumulative_length += new
        n = keys.shape[-2]
        if n > self.n_sink + self.window:
            keep = torch.cat(
                [torch.arange(self.n_sink, device=self.device), torch.arange(n - self.window, n, device=self.device)]
            )
            self.keys, self.values, self.positions = keys[..., keep, :], values[..., keep, :], positions[keep]
        else:
            self.keys, self.values, self.positions = keys, values, positions
        if self.on_update is not None:
            self.on_update(self.layer_idx, positions)
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return self.n_sink + self.window

    def stored_length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def reset(self) -> None:
        super().reset()
        self.cumulative_length = 0
        self.positions = None

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "the streaming (sink + window) cache evicts tokens and cannot be cropped; "
            "use decode='dense' for assisted or speculative decoding"
        )


def install_layers(cache: Cache, make_layer: Callable[[int, object], object | None], num_layers: int) -> list[str]:
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
        new = make_layer(i, layer)
        if new is None:
            notes.append("default cache layer")
        else:
            cache.layers[i] = new
            notes.append("installed")
    return notes
