"""Mistral: when `sliding_window` is set, every layer is a sliding-window layer."""

from attnpatch.adapters.base import FamilyAdapter, register_adapter

MISTRAL = register_adapter(FamilyAdapter("mistral", notes="config.sliding_window applies to every layer"))
