"""`blasst` prefill: skip key tiles whose scores are negligible against the running max (arXiv 2512.12087)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from attnpatch.methods.base import DenseFallback, PrefillContext, PrefillMethod
from attnpatch.options import Knob, option
from attnpatch.registry import register_prefill
from attnpatch.sparsity import BlockSelection, SkipRule
from attnpatch.sparsity.regions import allowed_blocks


def lambda_bound(lam: float, scale: float, convention: str = "scaled") -> float:
    """λ as the kernels' one skip bound: ln λ on scaled scores, or σ·ln λ to threshold raw q·k
    (`convention="raw"`); λ <= 0 never skips."""
    log_lam = math.log(lam) if lam > 0 else float("-inf")
    return log_lam * scale if convention == "raw" else log_lam


def skip_rule(a: float | tuple[float, ...], kv_len: int, scale: float, convention: str, device=None) -> SkipRule:
    """λ = min(a / L, 1) as a skip rule in the one convention (see `lambda_bound`); one `a` per query
    head gives a `[Hq]` bound."""
    if isinstance(a, tuple):
        bounds = [lambda_bound(min(x / kv_len, 1.0), scale, convention) for x in a]
        return SkipRule(torch.tensor(bounds, dtype=torch.float32, device=device))
    return SkipRule(lambda_bound(min(a / kv_len, 1.0), scale, convention))


def _as_tuple(a: float | tuple[float, ...]) -> tuple[float, ...]:
    return a if isinstance(a, tuple) else (a,)


@register_prefill("blasst")
@dataclass
class BlasstPrefill(PrefillMethod):
    """Skip a key tile when every row's tile max is below its running max + ln λ, with λ = a / L.

    Choices (methods.md §1): L is the full KV length of the call (as FlashInfer/TRT-LLM), and λ is
    capped at 1. `convention="scaled"` compares scaled scores σ·q·k (λ then bounds the ratio of a
    skipped probability to the row's running max probability); `"raw"` compares raw q·k, which
    NVIDIA's published factors assume — their `a` values are not transferable between the two.
    Tiles are visited left to right so the sink tile sets the running max first; the decision is
    per (query head, query block). Every tile some query may see is visited (causal, sliding
    window and padding clipped).

    `a` may be one value per query head (e.g. from a calibrated profile).
    Default `a = 128` (scaled): on SmolLM2-135M it skips 25 % of the prefill tiles at 4K and 30 %
    at 8K for +0.13 % perplexity on Pride and Prejudice and unchanged passkey accuracy; a = 1024
    skips 43–45 % for +0.6 % (bench/results/blasst_smollm2.md).
    """

    # H200, 32K: 17.2 ms with no tile skipped against cuDNN's 14.8; 13.1 ms (1.13×) at 66 % skipped (kernels, skip mode)
    fast_from: ClassVar[int | None] = 32768
    on_window_layers: ClassVar[str] = "select"  # clipped to the window (tested)
    full_density: ClassVar[dict] = {"a": 1e-30}  # λ ≈ 0: no tile is ever negligible
    knob: ClassVar = Knob("a", 1.0, 1e5, denser="lower", log=True)  # λ = a / L: larger a skips more

    a: float = option(128.0, "λ = a / L (L = KV length); 0 disables skipping", min=0.0, per_head=True)
    convention: str = option("scaled", "threshold on scaled (σ·q·k) or raw (q·k) scores", choices=("scaled", "raw"))
    block_size: int = option(128, "query/key tile size", choices=(16, 32, 64, 128))

    def select(self, query: torch.Tensor, key: torch.Tensor, ctx: PrefillContext):
        b, h, lq, _ = query.shape
        lk = key.shape[2]
        if not any(_as_tuple(self.a)):
            return DenseFallback("a = 0: no tile can be skipped")
        if lk <= self.block_size:
            return DenseFallback(f"input of {lk} keys fits in one {self.block_size}-key tile")
        rule = skip_rule(self.a, lk, ctx.scale, self.convention, query.device)
        bs = self.block_size
        if ctx.bounds.window is None and not ctx.bounds.has_padding:
            return BlockSelection.causal(b, h, lq, lk, bs, bs, query.device, rule)
        allowed = allowed_blocks(b, lq, lk, bs, bs, ctx.bounds, query.device)
        sel = BlockSelection.from_block_mask(allowed, bs, bs, lq, lk)
        return BlockSelection(sel.indices.expand(b, h, -1, -1), sel.counts.expand(b, h, -1), bs, bs, lq, lk, rule)
