"""The name of a model's cache argument: transformers 5.2x renamed `past_key_values` to `cache`
(the old name is deprecated, removed from model forwards in 5.40); 5.17 knows only the old one."""

from __future__ import annotations

import inspect


def cache_kwarg(model) -> str:
    """`"cache"` where the model's decoder takes it (then `generate` does too), else `"past_key_values"`."""
    forward = inspect.signature(model.base_model.forward).parameters
    return "cache" if "cache" in forward else "past_key_values"
