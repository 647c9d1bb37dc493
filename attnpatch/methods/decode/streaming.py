"""`streaming`: StreamingLLM's sinks + recent window as a cache that really bounds the stored KV, and as
the keys a decode step reads from a cache that keeps everything (a static cache)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from attnpatch.cache import SinkWindowLayer
from attnpatch.methods.base import DecodeContext, DecodeMethod, DecodeOutput
from attnpatch.options import option
from attnpatch.registry import register_decode
from attnpatch.sparsity import KeyBounds


def sink_window_decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bounds: KeyBounds,
                       n_sink: int, window: int, scale: float) -> torch.Tensor:
    """One decode query's attention over each row's first `n_sink` real keys and its last `window + 1`
    written keys (the query's own included), gathered from a cache holding every key.

    query `[B, Hq, 1, D]`, key / value `[B, Hkv, L, D]` -> `[B, Hq, 1, Dv]`. The written length is
    `bounds.key_end` (a static cache) or L; keys the bounds hide (padding, a tensor mask) stay hidden.
    Fixed shapes (`n_sink + window + 1` keys whatever L is) and no host sync: a compiled step replays it.
    """
    b, hq, _, d = query.shape
    hkv, lk, dv = key.shape[1], key.shape[2], value.shape[-1]
    device = query.device
    end = bounds.key_end.to(device, torch.long) if bounds.key_end is not None else \
        torch.full((b,), lk, dtype=torch.long, device=device)
    first = bounds.first_key(b, device).view(b, 1)
    end = end.view(b, 1)
    sinks = first + torch.arange(n_sink, device=device)
    recent = end - 1 - window + torch.arange(window + 1, device=device)
    positions = torch.cat([sinks, recent], -1)  # [B, T]
    ok = torch.cat([sinks < end, recent >= first + n_sink], -1)  # the window never repeats a sink
    index = positions.clamp(0, lk - 1)
    if bounds.key_valid is not None:
        ok = ok & bounds.key_valid.to(device).gather(1, index)
    if bounds.mask is not None:
        ok = ok & bounds.mask[:, 0, -1, :].to(device).expand(b, lk).gather(1, index)
    t = index.shape[-1]
    k = key.gather(2, index.view(b, 1, t, 1).expand(b, hkv, t, d))
    v = value.gather(2, index.view(b, 1, t, 1).expand(b, hkv, t, dv))
    q = query.reshape(b, hkv, hq // hkv, d)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale  # [B, Hkv, G, T]
    probs = torch.softmax(scores.masked_fill(~ok.view(b, 1, 1, t), float("-inf")), -1)
    return (probs @ v.float()).to(value.dtype).reshape(b, hq, 1, dv)


@register_decode("streaming")
@dataclass
class Streaming(DecodeMethod):
    """Keep `n_sink` first real tokens + the `window` most recent ones in the KV cache; evict the rest.

    Choices: cached keys keep their original RoPE positions (no re-rotation to cache positions as
    in the StreamingLLM paper), which is exact sink + window attention within the model's context
    window. In a left-padded batch the sinks are each row's first `n_sink` real tokens (the cache
    learns the padding from the batch's attention mask on its first update). Sliding-window layers
    keep transformers' own window cache.

    On a cache that keeps every token (a static cache, which cannot evict; or a cache that already held
    tokens when the patch came) the memory is not bounded, but each decode step reads only the same
    keys: the sinks and the last `window` keys before the query, gathered (`sink_window_decode`), so
    the step's cost does not grow with the context and it compiles to one graph. A prefill call of more
    than one token on such a cache attends as the prefill method says (on the evicting cache, a later
    prefill chunk sees only what was kept).
    """

    full_density: ClassVar[dict] = {"window": 1 << 30}

    n_sink: int = option(4, "tokens kept from the start of the sequence", min=0)
    window: int = option(512, "most recent tokens kept", min=1)

    def cache_layer(self, layer_idx: int, config: Any) -> SinkWindowLayer:
        return SinkWindowLayer(self.n_sink, self.window)

    def select(self, query: torch.Tensor, key: torch.Tensor, ctx: DecodeContext) -> DecodeOutput | None:
        layer = ctx.cache_layer
        if ctx.sliding_window is not None or layer is None or isinstance(layer, SinkWindowLayer):
            return None  # the layer's own window, no cache (the call's keys only), or the cache kept just these
        if key.shape[2] <= self.n_sink + self.window + 1:
            return None  # every key is a sink or in the window
        out = sink_window_decode(query, key, layer.values, ctx.bounds, self.n_sink, self.window, ctx.scale)
        return DecodeOutput(out, "sink-window gather")
