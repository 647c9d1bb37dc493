"""Tiny randomly initialised models of every supported family, for tests and examples (no download)."""

from __future__ import annotations

from typing import Any

import torch

TINY_FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma3")
_MODEL_TYPES = {"gemma3": "gemma3_text"}  # family name -> transformers model_type, where they differ


def tiny_config(family: str, sliding_window: int | None = None, **overrides: Any):
    """A 2-layer, GQA 2:1 random config of `family` for tests (with an optional small sliding window).

    With a window, Qwen2/Qwen3 get layer 0 full and layer 1 sliding, Gemma 3 the reverse. `gemma3` is the
    Gemma 3 text model with its own shape: MQA (4 query heads, 1 key/value head, as Gemma-3-270m), head
    dim 32, and `query_pre_attn_scalar` 24, so that the scale transformers passes (24**-0.5) differs from
    head_dim**-0.5; without a window both its layers are full-attention layers.
    """
    from transformers import AutoConfig

    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; choose from {', '.join(TINY_FAMILIES)}")
    kw: dict[str, Any] = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, tie_word_embeddings=False,
    )
    if family == "gemma3":
        kw.update(num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=24)
    if sliding_window is not None:
        kw["sliding_window"] = sliding_window
        if family in ("qwen2", "qwen3"):
            kw.update(use_sliding_window=True, max_window_layers=1)  # layer 0 full, layer 1 sliding
    kw.update(overrides)
    if family == "gemma3" and "layer_types" not in overrides:
        # Gemma 3's pattern, sliding first: every 6th layer full, the others sliding; the last layer is
        # full here so that 2 layers give one of each. Without a window every layer is full.
        n = kw["num_hidden_layers"]
        kw["layer_types"] = ["sliding_attention" if sliding_window is not None and (i + 1) % 6 and i < n - 1
                             else "full_attention" for i in range(n)]
    return AutoConfig.for_model(_MODEL_TYPES.get(family, family), **kw)


def tiny_model(family: str, sliding_window: int | None = None, seed: int = 0, **overrides: Any):
    """A randomly initialised tiny model in eval mode with SDPA attention."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(family, sliding_window, **overrides)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
