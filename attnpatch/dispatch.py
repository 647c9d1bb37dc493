"""The attention function registered with transformers: phase split, per-layer method, dense fallback."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from attnpatch.backends import Executors, get_executors
from attnpatch.methods.base import DecodeContext, DecodeMethod, DenseFallback, PrefillContext, PrefillMethod
from attnpatch.stats import LayerStats


@dataclass
class LayerPlan:
    """What one decoder layer runs."""

    prefill: PrefillMethod
    decode: DecodeMethod
    sliding_window: int | None
    stats: LayerStats


@dataclass
class PatchState:
    """Everything the registered attention function needs; owned by one `Patch`."""

    plans: list[LayerPlan]
    executors: Executors = field(default_factory=get_executors)
    positions: dict[int, torch.Tensor] = field(default_factory=dict)
    # Called on every sparse prefill call with (layer, query, key, value, selection, mask, scale):
    # fidelity tools record real Q/K/V through it. None on the normal path.
    observer: Callable | None = None

    def publish_positions(self, layer_idx: int, positions: torch.Tensor) -> None:
        """Called by cache layers whose returned keys are not positions 0..L-1."""
        self.positions[layer_idx] = positions


def _key_start(mask: torch.Tensor | None) -> torch.Tensor | None:
    """First key each row may attend to, read off the last query row of a boolean mask."""
    if mask is None or mask.dtype != torch.bool:
        return None
    return mask[:, 0, -1, :].to(torch.int8).argmax(dim=-1)


def make_attention_function(state: PatchState) -> Callable:
    """Build the function transformers calls as `attention_interface(module, q, k, v, mask, ...)`."""

    def attnpatch_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        layer = module.layer_idx
        plan = state.plans[layer]
        positions = state.positions.pop(layer, None)
        if positions is not None and attention_mask is not None and attention_mask.shape[-1] != key.shape[-2]:
            attention_mask = attention_mask.index_select(-1, positions.to(attention_mask.device))
        b, hq, lq, d = query.shape
        lk = key.shape[2]
        stats = plan.stats

        def dense():
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)

        scale = scaling if scaling is not None else 1.0 / math.sqrt(d)
        if lq == 1:
            stats.decode_calls += 1
            stats.max_decode_keys = max(stats.max_decode_keys, lk)
            if plan.decode.is_dense:
                return dense()
            pages = plan.decode.select(query, key, DecodeContext(layer, scale))
            if pages is None:
                return dense()
            key_mask = None if attention_mask is None else attention_mask[:, 0, -1, :]
            out, why = state.executors.decode(query, key, value, pages, scale=scale, key_mask=key_mask,
                                              tile_counts=stats.tile_counter("decode", query.device))
            if why is not None:
                stats.executor_fallbacks[f"decode: {why}"] += 1
            return out.transpose(1, 2).contiguous(), None
        stats.prefill_calls += 1
        method = plan.prefill
        block = getattr(method, "block_size", 64)
        if method.is_dense:
            stats.add_dense(b, hq, lq, lk, block, None)
            return dense()
        if dropout > 0.0:
            stats.add_dense(b, hq, lq, lk, block, "attention dropout (training)")
            return dense()
        ctx = PrefillContext(layer, scale, _key_start(attention_mask), plan.sliding_window)
        selection = method.select(query, key, ctx)
        if isinstance(selection, DenseFallback):
            stats.add_dense(b, hq, lq, lk, block, selection.reason)
            return dense()
        counter = stats.tile_counter("prefill", query.device) if selection.skip is not None else None
        out, why = state.executors.prefill(query, key, value, selection, scale=scale, mask=attention_mask,
                                           tile_counts=counter)
        if why is not None:
            stats.executor_fallbacks[f"prefill: {why}"] += 1
        if state.observer is not None:
            state.observer(layer, query, key, value, selection, attention_mask, scale)
        stats.add_selection(selection)
        return out.transpose(1, 2).contiguous(), None

    return attnpatch_attention
