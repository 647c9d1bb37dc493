"""Tiny randomly initialised models of every supported family, for tests and examples (no download)."""

from __future__ import annotations

from typing import Any

import torch

TINY_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


def tiny_config(family: str, sliding_window: int | None = None, **overrides: Any):
    """A 2-layer, GQA 2:1 random config of `family` for tests (with an optional small sliding window)."""
    from transformers import AutoConfig

    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; choose from {', '.join(TINY_FAMILIES)}")
    kw: dict[str, Any] = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, tie_word_embeddings=False,
    )
    if sliding_window is not None:
        kw["sliding_window"] = sliding_window
        if family in ("qwen2", "qwen3"):
            kw.update(use_sliding_window=True, max_window_layers=1)  # layer 0 full, layer 1 sliding
    kw.update(overrides)
    return AutoConfig.for_model(family, **kw)


def tiny_model(family: str, sliding_window: int | None = None, seed: int = 0, **overrides: Any):
    """A randomly initialised tiny model in eval mode with SDPA attention."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(family, sliding_window, **overrides)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
