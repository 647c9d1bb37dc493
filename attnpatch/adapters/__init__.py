"""Model families attnpatch knows, keyed by `config.model_type`."""

from attnpatch.adapters import gemma3, llama, mistral, qwen2, qwen3  # noqa: F401,E402  (registers families)
from attnpatch.adapters.base import FamilyAdapter, UnsupportedModelError, get_adapter, supported_families

__all__ = ["FamilyAdapter", "UnsupportedModelError", "get_adapter", "supported_families"]
