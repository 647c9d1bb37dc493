"""flash-attn-4 backend (placeholder until the adapter lands): declines everything with a reason."""

from __future__ import annotations

import torch

from attnpatch.backends.base import Backend


def flash_unavailable_reason(device: torch.device) -> str | None:
    try:
        import flash_attn.cute  # noqa: F401
    except Exception:
        return "flash-attn-4 is not installed (pip install 'attnpatch[flash]')"
    return "the flash-attn-4 adapter is not integrated yet"


class FlashBackend(Backend):
    name = "flash"
    description = "flash-attn-4 (CuTe DSL): block-sparse and dense causal prefill on Hopper / Blackwell"

    def unavailable(self, device: torch.device) -> str | None:
        return flash_unavailable_reason(device)
