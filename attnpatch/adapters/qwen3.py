"""Qwen3: per-head RMS norm on q and k (applied before attention); sliding layers from `config.layer_types`."""

from attnpatch.adapters.base import FamilyAdapter, register_adapter

QWEN3 = register_adapter(FamilyAdapter("qwen3", notes="q/k RMS norm before RoPE; sliding window from layer_types"))
