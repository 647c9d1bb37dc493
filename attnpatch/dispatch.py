"""The attention function registered with transformers: phase split, per-layer methods, backends,
dense fallbacks, stats and probe events."""

from __future__ import annotations

import math
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from attnpatch.backends import BackendPlan, resolve_backend
from attnpatch.masking import AttnMask, key_bounds
from attnpatch.methods.base import (
    DecodeContext,
    DecodeMethod,
    DecodeOutput,
    DenseFallback,
    PrefillContext,
    PrefillMethod,
)
from attnpatch.probe import AttentionCall, Observer
from attnpatch.sparsity import BoundPages, PageSelection
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
    """Everything the registered attention function needs; owned by one `Patch` and reached from
    the attention modules (so a deep copy of the model copies it)."""

    plans: list[LayerPlan]
    backends: BackendPlan = field(default_factory=resolve_backend)
    observers: list[Observer] = field(default_factory=list)
    _cache: Any = None  # weak reference to the Cache of the forward in progress (set by the pre-hook)
    # (dense tensor, AttnMask) of the masks `generate` built before the forward in progress (set by the pre-hook)
    premade_masks: list = field(default_factory=list)

    def set_cache(self, cache) -> None:
        self._cache = None if cache is None else weakref.ref(cache)

    def cache_layer(self, layer_idx: int):
        cache = self._cache() if self._cache is not None else None
        layers = getattr(cache, "layers", None)
        return layers[layer_idx] if layers is not None and layer_idx < len(layers) else None

    def attention(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        """What transformers calls as `attention_interface(module, q, k, v, mask, ...)`."""
        for dense, wrapped in self.premade_masks:  # a mask generate() built: the AttnMask it stands for
            if attention_mask is dense:
                attention_mask = wrapped
                break
        return _attend(self, module, query, key, value, attention_mask, dropout, scaling, **kwargs)


def _dense_mask(attention_mask, positions: torch.Tensor | None, kv_len: int):
    """The mask transformers' SDPA path takes, restricted to the keys a cache returned."""
    mask = attention_mask.dense() if isinstance(attention_mask, AttnMask) else attention_mask
    if mask is None or positions is None or mask.shape[-1] == kv_len:
        return mask
    if positions.dim() == 1:
        return mask.index_select(-1, positions.to(mask.device))
    b, _, lq, _ = mask.shape
    index = positions.to(mask.device).view(b, 1, 1, -1).expand(b, mask.shape[1], lq, positions.shape[-1])
    return torch.gather(mask.expand(b, mask.shape[1], lq, mask.shape[-1]), -1, index)


def _timed_select(stats: LayerStats, method: PrefillMethod, query, key, ctx: PrefillContext):
    """`method.select(...)`, timed into the layer's stats (CUDA events on GPU, host clock on CPU)."""
    if query.is_cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        selection = method.select(query, key, ctx)
        end.record()
        stats.select_events.append((start, end))
        return selection
    t0 = time.perf_counter()
    selection = method.select(query, key, ctx)
    stats.select_seconds += time.perf_counter() - t0
    return selection


def _within_written(pages: PageSelection, bounds) -> PageSelection:
    """Page lists stopped at the written length of a static cache (`bounds.key_end`) unless they already
    stop there (`PageSelection.within_written`: one fused kernel less per layer and step)."""
    if bounds.key_end is not None and not pages.within_written:
        return pages.clipped(bounds.key_end)
    return pages


def _select_pages(method: DecodeMethod, query, key, ctx: DecodeContext):
    """The method's page lists (`_within_written`), None or its own output."""
    pages = method.select(query, key, ctx)
    return _within_written(pages, ctx.bounds) if isinstance(pages, PageSelection) else pages


def _compiled_decode(state: PatchState, plan: LayerPlan, module, query, key, value, attention_mask, positions,
                     bounds, scale, dropout, scaling, cache_layer, kwargs):
    """A decode step inside `torch.compile`: the same method and backend choice as eager, without the
    per-call statistics and observers (Python counters read back every step would be guarded on and
    recompile; tile counters would be outputs a CUDA graph mutates). `Patch.stats()` counts eager steps.
    The method's `compiled_step` decides what to read; `attend` runs it (None: a dense decode)."""
    if state.observers:
        raise RuntimeError("attnpatch observers (calibration, fidelity probes) see eager calls only: run the decode "
                           "steps they should observe without torch.compile")
    method = plan.decode
    reason = type(method).compiled_step_reason
    if reason is not None:
        raise RuntimeError(f"decode method {method.name!r} cannot run in a compiled decode step: {reason}")

    def attend(pages: PageSelection | None) -> torch.Tensor:
        if pages is None:
            if not method.is_dense and dropout == 0.0:
                out, _ = state.backends.dense_decode(query, key, value, scale=scale, bounds=bounds, declined=[])
                if out is not None:
                    return out
            mask = _dense_mask(attention_mask, positions, key.shape[2])
            return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling,
                                          **kwargs)[0].transpose(1, 2)
        out, _ = state.backends.decode(query, key, value, _within_written(pages, bounds), scale=scale,
                                       bounds=bounds, declined=[])
        return out

    def with_page_lse(pages: PageSelection) -> tuple[torch.Tensor, torch.Tensor | None]:
        got, _ = state.backends.decode_page_lse(query, key, value, _within_written(pages, bounds), scale=scale,
                                                bounds=bounds, declined=[])
        return got if got is not None else (attend(pages), None)

    def bound(pages: BoundPages) -> torch.Tensor | None:
        out, _ = state.backends.decode_bound(query, key, value, pages, scale=scale, bounds=bounds, declined=[])
        return out

    attend.with_page_lse = with_page_lse
    attend.bound = bound
    if method.is_dense:
        out = attend(None)
    else:
        state.backends.resolve_decode_devices(query.device)
        ctx = DecodeContext(module.layer_idx, scale, bounds, plan.sliding_window, cache_layer)
        out = method.compiled_step(query, key, ctx, attend)
    return out.transpose(1, 2).contiguous(), None


def _attend(state: PatchState, module, query, key, value, attention_mask, dropout, scaling, **kwargs):
    """One attention call: phase split, the layer's method, a backend (or SDPA), stats, observers."""
    layer = module.layer_idx
    plan = state.plans[layer]
    stats = plan.stats
    b, hq, lq, d = query.shape
    lk = key.shape[2]
    cache_layer = state.cache_layer(layer)
    positions = getattr(cache_layer, "returned_positions", None)
    if positions is not None and positions.shape[-1] != lk:
        positions = None
    bounds = key_bounds(attention_mask, lq, lk, plan.sliding_window, positions)
    scale = scaling if scaling is not None else 1.0 / math.sqrt(d)
    phase = "decode" if lq == 1 else "prefill"
    declined: list[str] = []

    def finish(out_bhld: torch.Tensor, selection, method: str, backend: str):
        stats.backends[f"{phase}: {backend}"] += 1
        for why in declined:
            stats.backend_declined[why] += 1
        if state.observers:
            call = AttentionCall(layer, phase, query, key, value, out_bhld, scale, bounds, selection, method, backend)
            for observer in list(state.observers):
                observer(call)

    def dense(method: str, fast_decode: bool = False):
        out, backend = None, None
        if phase == "prefill" and dropout == 0.0:
            out, backend = state.backends.dense(query, key, value, scale=scale, bounds=bounds, declined=declined)
        elif fast_decode and dropout == 0.0:
            out, backend = state.backends.dense_decode(query, key, value, scale=scale, bounds=bounds,
                                                       declined=declined)
        if out is not None:
            finish(out, None, method, backend)
            return out.transpose(1, 2).contiguous(), None
        mask = _dense_mask(attention_mask, positions, lk)
        result = sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
        finish(result[0].transpose(1, 2), None, method, "sdpa")
        return result

    if phase == "decode":
        if torch.compiler.is_compiling():
            return _compiled_decode(state, plan, module, query, key, value, attention_mask, positions, bounds,
                                    scale, dropout, scaling, cache_layer, kwargs)
        stats.decode_calls += 1
        stats.max_decode_keys = max(stats.max_decode_keys, lk)
        method = plan.decode
        pages = None if method.is_dense else \
            _select_pages(method, query, key, DecodeContext(layer, scale, bounds, plan.sliding_window, cache_layer))
        stats.add_decode(pages, key, cache_layer, getattr(method, "budget", None))
        if pages is None:  # a sparse method's declined step: the fastest dense decode, not transformers' SDPA
            return dense(method.name, fast_decode=not method.is_dense)
        if isinstance(pages, DecodeOutput):  # the method computed the step itself (e.g. GPU + CPU parts)
            finish(pages.out, None, method.name, pages.backend)
            return pages.out.transpose(1, 2).contiguous(), None
        # tiles are counted where they can be skipped (a skip rule): elsewhere every listed tile is read
        # and counting would only add device work to the step
        counter = stats.tile_counter("decode", query.device) if pages.skip is not None else None
        out, backend = state.backends.decode(query, key, value, pages, scale=scale, bounds=bounds,
                                             tile_counts=counter, declined=declined)
        finish(out, pages, method.name, backend)
        return out.transpose(1, 2).contiguous(), None

    stats.prefill_calls += 1
    if plan.decode.observes_prefill:
        plan.decode.observe_prefill(query, key, DecodeContext(layer, scale, bounds, plan.sliding_window, cache_layer))
    method = plan.prefill
    block = 1 if method.granularity == "token" else getattr(method, "block_size", 64)
    if method.is_dense:
        stats.add_dense(b, hq, lq, lk, block, None)
        return dense(method.name)
    if dropout > 0.0:
        stats.add_dense(b, hq, lq, lk, block, "attention dropout (training)")
        return dense(method.name)
    if not bounds.causal:
        stats.add_dense(b, hq, lq, lk, block, "attention mask is not causal (e.g. image tokens attend within "
                        "their image): dense SDPA with the model's mask")
        return dense(method.name)
    if plan.sliding_window is not None and lk > plan.sliding_window and method.on_window_layers == "window":
        stats.add_dense(b, hq, lq, lk, block, "sliding-window layer: runs its window (the method applies to "
                        "full-attention layers)")
        return dense(method.name)
    gate = state.backends.speed_gate(method.name, method.fast_from, lk, query.device)
    if gate is not None:
        stats.add_dense(b, hq, lq, lk, block, gate)
        return dense(method.name)
    selection = _timed_select(stats, method, query, key, PrefillContext(layer, scale, bounds, plan.sliding_window))
    if isinstance(selection, DenseFallback):
        stats.add_dense(b, hq, lq, lk, block, selection.reason)
        return dense(method.name)
    counter = stats.tile_counter("prefill", query.device) if getattr(selection, "skip", None) is not None else None
    out, backend = state.backends.prefill(query, key, value, selection, scale=scale, bounds=bounds,
                                          tile_counts=counter, declined=declined)
    stats.add_selection(selection)
    finish(out, selection, method.name, backend)
    return out.transpose(1, 2).contiguous(), None
