"""`patch_model`: switch a loaded model's attention to an attnpatch method, and back."""

from __future__ import annotations

import inspect
import itertools
from typing import Any

from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from attnpatch.adapters import get_adapter
from attnpatch.backends import get_executors
from attnpatch.cache import install_layers
from attnpatch.dispatch import LayerPlan, PatchState, make_attention_function
from attnpatch.profile import Profile
from attnpatch.registry import get_method
from attnpatch.stats import LayerStats, PatchStats

_COUNTER = itertools.count()
_ATTR = "_attnpatch_patch"


def _route_options(prefill_info, decode_info, options: dict[str, Any]) -> tuple[dict, dict]:
    """Send each option to the method(s) that declare it; unknown options name what is allowed."""
    pre_names = {o.name for o in prefill_info.options}
    dec_names = {o.name for o in decode_info.options}
    pre, dec = {}, {}
    for key, value in options.items():
        if key not in pre_names and key not in dec_names:
            allowed = sorted(pre_names | dec_names)
            raise ValueError(
                f"unknown option {key!r} for method={prefill_info.name!r}, decode={decode_info.name!r}; "
                f"allowed options: {', '.join(allowed) if allowed else 'none'}"
            )
        if key in pre_names:
            pre[key] = value
        if key in dec_names:
            dec[key] = value
    return pre, dec


class Patch:
    """A model patched with one prefill and one decode method. Use as a context manager or call `unpatch()`."""

    def __init__(self, model, method: str = "dense", decode: str | None = None, profile: Profile | None = None,
                 backend: str = "auto", **options):
        if not hasattr(model, "config") or not hasattr(model, "set_attn_implementation"):
            raise TypeError(f"patch_model expects a transformers PreTrainedModel, got {type(model).__name__}")
        if not isinstance(method, str):
            raise ValueError(f"method must be a method name (str), got {method!r}; see attnpatch.list_methods()")
        if decode is not None and not isinstance(decode, str):
            raise ValueError(f"decode must be a method name (str) or None, got {decode!r}")
        if profile is not None and not isinstance(profile, Profile):
            raise ValueError(f"profile must be an attnpatch.Profile or None, got {type(profile).__name__}")
        executors = get_executors(backend)
        self.adapter = get_adapter(model.config)
        self.model = model
        self.method, self.decode = method, decode or "dense"
        self.options = dict(options)
        self.profile = profile
        num_layers = self.adapter.num_layers(model.config)
        windows = self.adapter.sliding_windows(model.config)
        if profile is not None:
            profile.check(model.config, num_layers)
        plans = [self._plan(i, windows[i]) for i in range(num_layers)]

        previous = getattr(model, _ATTR, None)
        if previous is not None:
            previous.unpatch()
        self.state = PatchState(plans, executors)
        self.name = f"attnpatch_{next(_COUNTER)}"
        self._original = model.config._attn_implementation
        AttentionInterface.register(self.name, make_attention_function(self.state))
        AttentionMaskInterface.register(self.name, sdpa_mask)
        model.set_attn_implementation(self.name)
        self._hook = None
        if any(p.decode.keeps_own_cache for p in plans):
            self._hook = self._install_cache_hook()
        setattr(model, _ATTR, self)
        self.active = True

    def _plan(self, layer: int, window: int | None) -> LayerPlan:
        pre_info, dec_info = get_method(self.method, "prefill"), get_method(self.decode, "decode")
        pre_opts, dec_opts = _route_options(pre_info, dec_info, self.options)
        override = self.profile.for_layer(layer) if self.profile is not None else {}
        if override:
            # A layer may switch method: global options go on only where the layer's method declares them;
            # the layer's own options are checked strictly.
            pre_info = get_method(override.pop("method", self.method), "prefill")
            dec_info = get_method(override.pop("decode", self.decode), "decode")
            pre_names, dec_names = {o.name for o in pre_info.options}, {o.name for o in dec_info.options}
            pre_o, dec_o = _route_options(pre_info, dec_info, override)
            pre_opts = {k: v for k, v in pre_opts.items() if k in pre_names} | pre_o
            dec_opts = {k: v for k, v in dec_opts.items() if k in dec_names} | dec_o
        stats = LayerStats(layer, pre_info.name, dec_info.name, sliding_window=window)
        return LayerPlan(pre_info.build(**pre_opts), dec_info.build(**dec_opts), window, stats)

    def _install_cache_hook(self):
        base = self.model.base_model
        params = inspect.signature(base.forward).parameters
        cache_kw = "cache" if "cache" in params else "past_key_values"
        num_layers = len(self.state.plans)

        def make_layer(i: int, _default):
            plan = self.state.plans[i]
            if plan.sliding_window is not None:
                return None
            return plan.decode.cache_layer(i, self.model.config, self.state.publish_positions)

        def hook(module, args, kwargs):
            cache = kwargs.get(cache_kw, kwargs.get("past_key_values"))
            use_cache = kwargs.get("use_cache")
            use_cache = module.config.use_cache if use_cache is None else use_cache
            if cache is None and use_cache:
                cache = DynamicCache(config=module.config)
                kwargs[cache_kw] = cache
            if isinstance(cache, Cache) and not getattr(cache, "_attnpatch_installed", False):
                notes = install_layers(cache, make_layer, num_layers)
                for plan, note in zip(self.state.plans, notes, strict=True):
                    if note != "installed" and note not in plan.stats.notes:
                        plan.stats.notes.append(note)
                cache._attnpatch_installed = True
            return args, kwargs

        return base.register_forward_pre_hook(hook, with_kwargs=True)

    def unpatch(self) -> None:
        """Restore the model's original attention implementation and remove every hook."""
        if not self.active:
            return
        self.model.set_attn_implementation(self._original)
        if self._hook is not None:
            self._hook.remove()
        ALL_ATTENTION_FUNCTIONS._global_mapping.pop(self.name, None)
        ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.pop(self.name, None)
        if getattr(self.model, _ATTR, None) is self:
            delattr(self.model, _ATTR)
        self.active = False

    def stats(self) -> PatchStats:
        """Per-layer (and per-head) density, kept blocks, dense fallbacks with reasons, decode cache sizes."""
        return PatchStats([p.stats.as_dict() for p in self.state.plans])

    def reset_stats(self) -> None:
        for p in self.state.plans:
            p.stats = LayerStats(p.stats.layer, p.stats.prefill_method, p.stats.decode_method, p.sliding_window)

    def __enter__(self) -> Patch:
        return self

    def __exit__(self, *exc) -> None:
        self.unpatch()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"Patch(method={self.method!r}, decode={self.decode!r}, {state})"


def patch_model(model, method: str = "dense", decode: str | None = None, profile: Profile | None = None,
                backend: str = "auto", **options) -> Patch:
    """Patch `model` in place so its attention runs `method` in prefill and `decode` in decoding.

    Options go to whichever of the two methods declares them. `backend` picks the executors
    ("auto": the fastest available for the device; "reference": exact PyTorch). Patching a patched
    model replaces the old patch. Returns a `Patch` (context manager; `.unpatch()`, `.stats()`).
    """
    return Patch(model, method=method, decode=decode, profile=profile, backend=backend, **options)


def unpatch_model(model) -> None:
    """Remove attnpatch's patch from `model`, if any."""
    patch = getattr(model, _ATTR, None)
    if patch is not None:
        patch.unpatch()
