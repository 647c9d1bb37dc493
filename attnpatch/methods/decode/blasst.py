"""`blasst` decode: skip cached pages whose scores are negligible against the running max."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from attnpatch.methods.base import DecodeContext, DecodeMethod
from attnpatch.methods.prefill.blasst import skip_rule
from attnpatch.options import option
from attnpatch.registry import register_decode
from attnpatch.sparsity import PageSelection


@register_decode("blasst")
@dataclass
class BlasstDecode(DecodeMethod):
    """Skip a cached page when its max is below the running max + ln λ for every head of its KV group.

    λ = a / L (L = the cache length; same conventions as the prefill method).

    Choices: the G query heads of a KV head decide jointly (one V load per page); pages are visited
    in order, so the sink page sets the running max first. Default `a = 1`: skips 31 % of the
    decode pages on SmolLM2 at 4K with unchanged passkey answers; 16 skips 62 %, 256 skips 78 %,
    also unchanged on those 3 prompts (bench/results/blasst_smollm2_decode.md) — kept conservative.
    """

    full_density: ClassVar[dict] = {"a": 1e-30}

    a: float = option(1.0, "λ = a / L (L = cache length); 0 disables skipping", min=0.0, per_head=True)
    convention: str = option("scaled", "threshold on scaled (σ·q·k) or raw (q·k) scores", choices=("scaled", "raw"))
    page_size: int = option(128, "key tile (page) size", choices=(16, 32, 64, 128))

    def select(self, query: torch.Tensor, key: torch.Tensor, ctx: DecodeContext) -> PageSelection | None:
        if not any(self.a if isinstance(self.a, tuple) else (self.a,)):
            return None
        b, lk = query.shape[0], key.shape[2]
        return PageSelection.all_pages(b, key.shape[1], lk, self.page_size, query.device,
                                       skip_rule(self.a, lk, ctx.scale, self.convention, query.device))
