"""`streaming`: StreamingLLM's sinks + recent window as a cache that really bounds the stored KV."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from attnpatch.cache import SinkWindowLayer
from attnpatch.methods.base import DecodeMethod
from attnpatch.options import option
from attnpatch.registry import register_decode


@register_decode("streaming")
@dataclass
class Streaming(DecodeMethod):
    """Keep `n_sink` first real tokens + the `window` most recent ones in the KV cache; evict the rest.

    Choices: cached keys keep their original RoPE positions (no re-rotation to cache positions as
    in the StreamingLLM paper), which is exact sink + window attention within the model's context
    window. In a left-padded batch the sinks are each row's first `n_sink` real tokens (the cache
    learns the padding from the batch's attention mask on its first update). Sliding-window layers
    keep transformers' own window cache.
    """

    full_density: ClassVar[dict] = {"window": 1 << 30}
    static_cache_reason: ClassVar[str | None] = (
        "it evicts tokens from its cache (sinks + window), which a preallocated static cache cannot do; "
        "generate with the default dynamic cache")

    n_sink: int = option(4, "tokens kept from the start of the sequence", min=0)
    window: int = option(512, "most recent tokens kept", min=1)

    def cache_layer(self, layer_idx: int, config: Any) -> SinkWindowLayer:
        return SinkWindowLayer(self.n_sink, self.window)
