"""`patch_model`: switch a loaded model's attention to attnpatch methods, and back.

One attention function and one mask function are registered with transformers under the name
`attnpatch`; they are stateless and read the patch's state from the attention module they are
called for. So a deep copy of a patched model is an independently patched model (its own state and
stats), and several models can be patched at once.

Patches on one model form a stack: patching a patched model suspends the active patch and runs the
new one; unpatching the top one restores the one below (a nested `with patch_model(...)` hands the
model back to the outer patch on exit). `unpatch_model(model)` removes them all.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import AttentionMaskInterface

import attnpatch.methods  # noqa: F401  (registers the built-in methods)
from attnpatch.adapters import get_adapter
from attnpatch.adapters.cache_arg import cache_kwarg
from attnpatch.backends import resolve_backend
from attnpatch.cache import install_layers
from attnpatch.dispatch import LayerPlan, PatchState
from attnpatch.masking import AttnMask, attnpatch_mask
from attnpatch.options import for_layer
from attnpatch.probe import Observer, ObserverHandle
from attnpatch.profile import Profile
from attnpatch.registry import get_method
from attnpatch.spec import PatchSpec, route_options
from attnpatch.stats import LayerStats, PatchStats

IMPLEMENTATION = "attnpatch"
_STATE_ATTR = "_attnpatch_state"  # on every attention module of a patched model
_STACK_ATTR = "_attnpatch_stack"  # on the model: its patches, the active one last


def _attention(module, *args, **kwargs):
    state = getattr(module, _STATE_ATTR, None)
    if state is None:
        raise RuntimeError(
            f"{type(module).__name__} runs attn_implementation={IMPLEMENTATION!r} but carries no attnpatch "
            "state: patch the model with attnpatch.patch_model instead of setting the implementation by hand"
        )
    return state.attention(module, *args, **kwargs)


AttentionInterface.register(IMPLEMENTATION, _attention)
AttentionMaskInterface.register(IMPLEMENTATION, attnpatch_mask)


def _first_real(mask) -> torch.Tensor | None:
    """Each row's first non-padding position `[B]` from a forward's `attention_mask`: a 2-D padding mask, or
    the full-attention mask `generate` builds before the forward with a static cache (an `AttnMask`'s key
    validity, or a 4-D mask's last query row, which sees every real key). None: no padding information."""
    if isinstance(mask, dict):
        mask = mask.get("full_attention")
    if isinstance(mask, AttnMask):
        return None if mask.key_valid is None else mask.key_valid.to(torch.int8).argmax(-1)
    if not isinstance(mask, torch.Tensor) or mask.dim() not in (2, 4):
        return None
    visible = mask if mask.dim() == 2 else mask[:, 0, -1]
    if visible.is_floating_point():
        visible = visible == 0 if mask.dim() == 4 else visible != 0
    return visible.to(torch.int8).argmax(-1)


def _dense_premade_masks(kwargs: dict) -> list[tuple[torch.Tensor, AttnMask]]:
    """`generate` with a static cache builds the masks before the forward (our mask function may answer
    with an `AttnMask`) and passes them as `attention_mask`; the model's own mask creation then only
    takes tensors as "already built": hand it the dense tensor `sdpa_mask` builds (what it would get
    unpatched). Returns `(dense tensor, AttnMask)` pairs, so that the dispatch gets each layer the
    `AttnMask` back (whose bounds are derived once for all the layers of the step)."""
    mask = kwargs.get("attention_mask")
    masks = mask if isinstance(mask, dict) else {None: mask}
    if not any(isinstance(m, AttnMask) for m in masks.values()):
        return []
    dense = {k: m.dense() if isinstance(m, AttnMask) else m for k, m in masks.items()}
    kwargs["attention_mask"] = dense if isinstance(mask, dict) else dense[None]
    return [(dense[k], m) for k, m in masks.items() if isinstance(m, AttnMask) and isinstance(dense[k], torch.Tensor)]


def _attention_modules(model) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups")]


class Patch:
    """A model patched with one prefill and one decode method. Use as a context manager or call `unpatch()`."""

    def __init__(self, model, spec: PatchSpec):
        if not hasattr(model, "config") or not hasattr(model, "set_attn_implementation"):
            raise TypeError(f"patch_model expects a transformers PreTrainedModel, got {type(model).__name__}")
        self.adapter = get_adapter(model.config)
        self.model, self.spec = model, spec
        self.method, self.decode = spec.method, spec.decode
        num_layers = self.adapter.num_layers(model.config)
        self.profile = spec.effective_profile()
        if self.profile is not None:
            self.profile.check(model, num_layers, spec.allow_other_weights)
            made_for = self.profile.meta.get("method")
            if made_for and spec.method not in ("dense", made_for):
                raise ValueError(f"profile {self.profile.name!r} was calibrated for method {made_for!r}; patch with "
                                 f"method={made_for!r} (or leave the method out) to use it, not {spec.method!r}")
            decodes = {e.get("decode") for e in self.profile.layers.values()} - {None}
            if decodes and spec.decode not in ("dense", *decodes):
                raise ValueError(f"profile {self.profile.name!r} sets decode method {', '.join(sorted(decodes))}; "
                                 f"patch with decode={sorted(decodes)[0]!r} (or leave decode out), not {spec.decode!r}")
        windows = self.adapter.sliding_windows(model.config)
        heads = self.adapter.heads(model.config)[0]
        plans = [self._plan(i, windows[i], heads, num_layers) for i in range(num_layers)]
        self.state = PatchState(plans, resolve_backend(spec.backend))
        self._warn_if_always_dense(model)
        self._own_cache = any(p.decode.keeps_own_cache for p in plans)
        # (method, why) of the first layer whose decode method cannot run on a static cache
        self._no_static = next(((p.decode.name, type(p.decode).static_cache_reason) for p in plans
                                if type(p.decode).static_cache_reason is not None), None)
        self._cache_kw = cache_kwarg(model)
        self.active = False
        stack = getattr(model, _STACK_ATTR, None)
        if stack is None:
            stack = []
            setattr(model, _STACK_ATTR, stack)
            self._original = model.config._attn_implementation
        else:
            self._original = stack[0]._original if stack else model.config._attn_implementation
            if stack:
                stack[-1]._deactivate()
        stack.append(self)
        self._activate()

    def _warn_if_always_dense(self, model) -> None:
        """Backend "auto" on CUDA runs a method measured slower than dense at every length as dense
        (`BackendPlan.speed_gate`): say so once, when patching, rather than only in the stats."""
        device = next(model.parameters(), torch.empty(0)).device
        for plan in self.state.plans:
            reason = self.state.backends.speed_gate(plan.prefill.name, plan.prefill.fast_from, 1 << 62, device)
            if reason is not None:
                warnings.warn(f"{plan.prefill.name} will run its prefill dense here: {reason}", stacklevel=3)
                return

    # -- plans ---------------------------------------------------------------------------------
    def _plan(self, layer: int, window: int | None, heads: int, layers: int) -> LayerPlan:
        spec = self.spec
        pre_info, dec_info = get_method(spec.method, "prefill"), get_method(spec.decode, "decode")
        pre_opts, dec_opts = dict(spec.prefill_options), dict(spec.decode_options)
        override = self.profile.for_layer(layer) if self.profile is not None else {}
        where = ""
        if override:
            where = f" (layer {layer} of profile {self.profile.name!r})"
            # A layer may switch method: the spec's options stay only where the layer's method declares them.
            pre_info = get_method(override.pop("method", spec.method), "prefill")
            dec_info = get_method(override.pop("decode", spec.decode), "decode")
            pre_o = dict(override.pop("prefill_options", {}) or {})
            dec_o = dict(override.pop("decode_options", {}) or {})
            try:
                flat_pre, flat_dec = route_options(pre_info, dec_info, override)
            except ValueError as e:
                raise ValueError(f"{e}{where}") from None
            pre_opts = {k: v for k, v in pre_opts.items() if k in pre_info.option_names} | flat_pre | pre_o
            dec_opts = {k: v for k, v in dec_opts.items() if k in dec_info.option_names} | flat_dec | dec_o
        pre_opts = {k: for_layer(v, layer, layers, k) for k, v in pre_opts.items()}
        dec_opts = {k: for_layer(v, layer, layers, k) for k, v in dec_opts.items()}
        stats = LayerStats(layer, pre_info.name, dec_info.name, sliding_window=window)
        return LayerPlan(pre_info.build(pre_opts, heads, where), dec_info.build(dec_opts, heads, where), window, stats)

    # -- activation ------------------------------------------------------------------------------
    def _activate(self) -> None:
        for module in _attention_modules(self.model):
            setattr(module, _STATE_ATTR, self.state)
        self.model.set_attn_implementation(IMPLEMENTATION)
        # No handle is kept: a handle's weak reference would survive a deep copy of the model and
        # point the copy at the original's hooks. The hook is found again by identity on removal.
        self.model.base_model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
        self.active = True

    def _deactivate(self) -> None:
        base = self.model.base_model
        for key, fn in list(base._forward_pre_hooks.items()):
            if getattr(fn, "__self__", None) is self:
                del base._forward_pre_hooks[key]
                base._forward_pre_hooks_with_kwargs.pop(key, None)
        for module in _attention_modules(self.model):
            if getattr(module, _STATE_ATTR, None) is self.state:
                delattr(module, _STATE_ATTR)
        self.state.set_cache(None)
        self.active = False

    def _pre_forward(self, module, args, kwargs):
        """Before every forward: give the decode method its cache layers (on a new, empty cache),
        tell cache layers where each row's real tokens start, and record the cache for the dispatch."""
        cache_kw = self._cache_kw
        cache = kwargs.get(cache_kw, kwargs.get("past_key_values"))
        use_cache = kwargs.get("use_cache")
        use_cache = module.config.use_cache if use_cache is None else use_cache
        plans = self.state.plans
        own_cache = self._own_cache
        if cache is None and use_cache and own_cache:
            cache = DynamicCache(config=module.config)
            kwargs[cache_kw] = cache
        if isinstance(cache, Cache):
            if self._no_static is not None:
                self._check_static(cache)
            if own_cache and not getattr(cache, "_attnpatch_installed", False):
                notes = install_layers(cache, self._make_cache_layer, len(plans))
                for plan, note in zip(plans, notes, strict=True):
                    if note != "installed" and note not in plan.stats.notes:
                        plan.stats.notes.append(note)
                cache._attnpatch_installed = True
            padded_layers = [layer for layer in cache.layers if hasattr(layer, "set_first_real")]
            if padded_layers:
                start = _first_real(kwargs.get("attention_mask"))
                for layer in padded_layers:
                    layer.set_first_real(start)
        self.state.set_cache(cache if isinstance(cache, Cache) else None)
        premade = _dense_premade_masks(kwargs)
        if premade or self.state.premade_masks:  # no attribute write where there is nothing to record (compiled steps)
            self.state.premade_masks = premade
        return args, kwargs

    def _check_static(self, cache) -> None:
        """ValueError when the cache is static (preallocated, e.g. `cache_implementation="static"`) and a
        layer's decode method cannot run on one (`DecodeMethod.static_cache_reason`)."""
        static = [type(layer).__name__ for layer in getattr(cache, "layers", [])
                  if getattr(layer, "is_compileable", False)]
        if static:
            method, reason = self._no_static
            raise ValueError(f"decode method {method!r} cannot run on a static cache ({static[0]} layers, "
                             f"e.g. cache_implementation='static'): {reason}")

    def _make_cache_layer(self, i: int):
        plan = self.state.plans[i]
        if plan.sliding_window is not None:
            return None
        return plan.decode.cache_layer(i, self.model.config)

    # -- public --------------------------------------------------------------------------------
    def unpatch(self) -> None:
        """Remove this patch: the patch below it on the model (if any) becomes active again, else the
        model's original attention implementation is restored exactly."""
        stack = getattr(self.model, _STACK_ATTR, [])
        if self not in stack:
            return
        was_top = stack[-1] is self
        stack.remove(self)
        if self.active:
            self._deactivate()
        if was_top:
            if stack:
                stack[-1]._activate()
            else:
                self.model.set_attn_implementation(self._original)
        if not stack and getattr(self.model, _STACK_ATTR, None) is stack:
            delattr(self.model, _STACK_ATTR)

    def observe(self, observer: Observer) -> ObserverHandle:
        """Call `observer(AttentionCall)` on every attention call of this patch, dense ones included."""
        if not callable(observer):
            raise ValueError(f"an observer must be callable, got {type(observer).__name__}")
        self.state.observers.append(observer)
        return ObserverHandle(self.state.observers, observer)

    def stats(self) -> PatchStats:
        """Per-layer (and per-head) density, kept blocks, dense fallbacks with reasons, backends that
        ran and why faster ones declined, decode cache sizes."""
        return PatchStats([p.stats.as_dict() for p in self.state.plans])

    def reset_stats(self) -> None:
        for p in self.state.plans:
            p.stats = LayerStats(p.stats.layer, p.stats.prefill_method, p.stats.decode_method, p.sliding_window)

    def __enter__(self) -> Patch:
        return self

    def __exit__(self, *exc) -> None:
        self.unpatch()

    def __repr__(self) -> str:
        state = "active" if self.active else (
            "suspended" if self in getattr(self.model, _STACK_ATTR, []) else "removed")
        return f"Patch({self.spec}, {state})"


def patch_model(model, method: str | PatchSpec = "dense", decode: str | None = None,
                profile: Profile | str | Path | None = None, backend: str | Mapping[str, str] = "auto", *,
                prefill_options: Mapping[str, Any] | None = None, decode_options: Mapping[str, Any] | None = None,
                allow_other_weights: bool = False, profile_shift: float = 0.0, profile_sparsity: float | None = None,
                **options: Any) -> Patch:
    """Patch `model` in place so its attention runs `method` in prefill and `decode` in decoding.

    `method` / `decode` are method names (`attnpatch.list_methods()`), optionally with options as
    `"name:key=value,..."`, or `method` is a whole `PatchSpec`. A flat option goes to the one method
    that declares it; one both declare goes in `prefill_options=` / `decode_options=`. `profile`: a
    `Profile` or its JSON path (per-layer / per-head parameters of this checkpoint), scaled at run time by
    `profile_shift` (knob profiles: + denser) or `profile_sparsity` (BLASST fits: skipped share). `backend`:
    "auto" (the fastest measured that takes the input; on CUDA, dense where dense was measured faster),
    "sparse" ("auto" that always runs the method), "reference", "triton", "flex", "flash", or
    `{"prefill": ..., "decode": ...}`. Returns a `Patch` (context manager; `.unpatch()`, `.stats()`,
    `.observe(fn)`).
    """
    if isinstance(method, PatchSpec):
        given = (decode, profile, prefill_options, decode_options, options, backend != "auto", allow_other_weights,
                 profile_shift, profile_sparsity is not None)
        if any(given):
            raise ValueError("pass either a PatchSpec or method/decode/options, not both")
        spec = method
    else:
        spec = PatchSpec.build(method, decode, prefill_options=prefill_options, decode_options=decode_options,
                               profile=profile, backend=backend, allow_other_weights=allow_other_weights,
                               profile_shift=profile_shift, profile_sparsity=profile_sparsity, **options)
    return Patch(model, spec)


def unpatch_model(model) -> None:
    """Remove every attnpatch patch from `model`, restoring its original attention implementation."""
    for patch in reversed(list(getattr(model, _STACK_ATTR, []))):
        patch.unpatch()
