"""What attnpatch needs to know about a model family, and the lookup by `config.model_type`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class UnsupportedModelError(ValueError):
    """The model's architecture is not one attnpatch supports."""


@dataclass(frozen=True)
class FamilyAdapter:
    """A decoder family: its name, notes, and how to read GQA layout and sliding-window layers."""

    model_type: str
    notes: str = ""

    def text_config(self, config: Any) -> Any:
        return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config

    def num_layers(self, config: Any) -> int:
        return self.text_config(config).num_hidden_layers

    def heads(self, config: Any) -> tuple[int, int, int]:
        """(query heads, key/value heads, head_dim)."""
        c = self.text_config(config)
        hq = c.num_attention_heads
        hkv = getattr(c, "num_key_value_heads", None) or hq
        d = getattr(c, "head_dim", None) or c.hidden_size // hq
        return hq, hkv, d

    def sliding_windows(self, config: Any) -> list[int | None]:
        """Per layer, its sliding window in tokens, or None for a full-attention layer."""
        c = self.text_config(config)
        n = c.num_hidden_layers
        window = getattr(c, "sliding_window", None)
        types = getattr(c, "layer_types", None)
        if types is not None:
            return [window if t == "sliding_attention" else None for t in types[:n]]
        return [window] * n


_ADAPTERS: dict[str, FamilyAdapter] = {}
_HINTS: dict[str, str] = {}  # model types that are not supported as a whole, and what to do instead


def register_hint(model_type: str, hint: str) -> None:
    """Say, in the UnsupportedModelError for `model_type`, why it is refused and what to patch instead."""
    _HINTS[model_type] = hint


def register_adapter(adapter: FamilyAdapter) -> FamilyAdapter:
    _ADAPTERS[adapter.model_type] = adapter
    return adapter


def supported_families() -> list[str]:
    return sorted(_ADAPTERS)


def get_adapter(config: Any) -> FamilyAdapter:
    """The adapter for `config.model_type`; UnsupportedModelError naming the supported families otherwise."""
    model_type = getattr(config, "model_type", None)
    if model_type not in _ADAPTERS:
        hint = f" ({_HINTS[model_type]})" if model_type in _HINTS else ""
        raise UnsupportedModelError(
            f"attnpatch does not support model_type {model_type!r}{hint}; supported families: "
            f"{', '.join(supported_families())}"
        )
    return _ADAPTERS[model_type]
