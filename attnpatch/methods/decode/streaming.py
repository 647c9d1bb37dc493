"""`streaming`: StreamingLLM's sinks + recent window as a cache that really bounds the stored KV."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from attnpatch.cache import SinkWindowLayer
from attnpatch.methods.base import DecodeMethod
from attnpatch.registry import option, register_method


@register_method("streaming", "decode")
@dataclass
class Streaming(DecodeMethod):
    """Keep `n_sink` first tokens + the `window` most recent ones in the KV cache; evict the rest.

    Choice: cached keys keep their original RoPE positions (no re-rotation to cache positions as
    in the StreamingLLM paper), which is exact sink + window attention within the model's context
    window. Sliding-window layers keep transformers' own window cache.
    """

    n_sink: int = option(4, "tokens kept from the start of the sequence", min=0)
    window: int = option(512, "most recent tokens kept", min=1)

    def cache_layer(self, layer_idx: int, config: Any, on_update=None) -> SinkWindowLayer:
        return SinkWindowLayer(self.n_sink, self.window, layer_idx, on_update)
