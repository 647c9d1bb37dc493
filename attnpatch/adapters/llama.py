"""Llama (and SmolLM2, a Llama-architecture model): full attention in every layer, GQA."""

from attnpatch.adapters.base import FamilyAdapter, register_adapter

LLAMA = register_adapter(FamilyAdapter("llama", notes="full attention in every layer"))
