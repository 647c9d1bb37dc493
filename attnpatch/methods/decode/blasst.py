"""`blasst` decode: skip cached pages whose scores are negligible against the running max."""

from __future__ import annotations

from dataclasses import dataclass, field
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

    On a static cache (`cache_implementation="static"`) L is the cache's capacity, not its written
    length: λ stays a host constant (a compiled step is not recompiled as the cache fills, and no
    device value is read back); `generate` sizes that cache to the prompt plus the new tokens, so the
    two differ by at most `max_new_tokens`. Per-head bounds are built once per (L, scale, device), so
    a step copies nothing from the host.
    """

    full_density: ClassVar[dict] = {"a": 1e-30}

    a: float = option(1.0, "λ = a / L (L = cache length); 0 disables skipping", min=0.0, per_head=True)
    convention: str = option("scaled", "threshold on scaled (σ·q·k) or raw (q·k) scores", choices=("scaled", "raw"))
    page_size: int = option(128, "key tile (page) size", choices=(16, 32, 64, 128))
    _rules: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # skip rules by (L, σ, device)

    def select(self, query: torch.Tensor, key: torch.Tensor, ctx: DecodeContext) -> PageSelection | None:
        if not any(self.a if isinstance(self.a, tuple) else (self.a,)):
            return None
        b, lk = query.shape[0], key.shape[2]
        memo = (lk, ctx.scale, str(query.device))
        rule = self._rules.get(memo)
        if rule is None:
            if len(self._rules) >= 4:  # a growing dynamic cache makes a new L every step: keep a few
                self._rules.clear()
            rule = self._rules[memo] = skip_rule(self.a, lk, ctx.scale, self.convention, query.device)
        return PageSelection.all_pages(b, key.shape[1], lk, self.page_size, query.device, rule)
