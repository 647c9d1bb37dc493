"""Qwen2 / Qwen2.5: q/k/v projections carry biases; sliding-window layers follow `config.layer_types`."""

from attnpatch.adapters.base import FamilyAdapter, register_adapter

QWEN2 = register_adapter(
    FamilyAdapter("qwen2", notes="biased q/k/v projections; sliding window from layer_types (use_sliding_window)")
)
