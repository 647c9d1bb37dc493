"""`xattention`: antidiagonal block scores + cumulative-mass selection per head (XAttention,
arXiv 2503.16428; methods.md §10.2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from attnpatch.estimators.antidiagonal import antidiagonal_block_scores
from attnpatch.methods.base import PrefillContext
from attnpatch.methods.estimated import BlockScores, EstimatedPrefill
from attnpatch.options import Knob, option
from attnpatch.registry import register_prefill
from attnpatch.sparsity import num_blocks


@dataclass(frozen=True)
class MassAfterSinkAndDiagonal:
    """XAttention's selector: per query block, the sink block (the row's first allowed block) and the
    diagonal block (its last allowed one) are kept and their mass counted first; the other allowed
    blocks follow in descending score until the kept mass reaches `threshold` of the row's total.
    A threshold of 1 or more keeps every allowed block."""

    param: str
    kind: ClassVar[str] = "cumulative mass after sink and diagonal"

    def __call__(self, scores: torch.Tensor, allowed: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        tau = param.to(scores.device, torch.float32).view(1, -1, 1, 1)
        cols = scores.shape[-1]
        c = torch.arange(cols, device=scores.device)
        first = allowed.to(torch.int8).argmax(-1, keepdim=True)
        last = cols - 1 - allowed.flip(-1).to(torch.int8).argmax(-1, keepdim=True)
        forced = ((c == first) | (c == last)) & allowed
        s = scores.float().clamp(min=0).masked_fill(~allowed, 0.0)
        total = s.sum(-1, keepdim=True)
        rest = s.masked_fill(forced, 0.0)
        ordered, order = rest.sort(dim=-1, descending=True, stable=True)
        before = (s * forced).sum(-1, keepdim=True) + ordered.cumsum(-1) - ordered
        keep = torch.zeros(s.shape, dtype=torch.bool, device=s.device).scatter(-1, order, before < tau * total)
        return (keep | forced | (tau >= 1.0)) & allowed


@register_prefill("xattention")
@dataclass
class XAttention(EstimatedPrefill):
    """XAttention: antidiagonal block scores, blocks kept up to cumulative mass `threshold` per head.

    Antidiagonal scoring with stride S, then per query block the sink and diagonal blocks plus the
    highest-mass blocks until their share reaches `threshold` (per head).

    Estimate (`estimators/antidiagonal.py`): per S×S tile one antidiagonal of q·k, scaled by
    `scale / S`, softmax over the key groups each query group may see, summed into blocks; 1/S of
    QKᵀ's FLOPs. On the GPU one fused Triton kernel (two passes, the group scores never written:
    3.1 ms at 32K, 56 ms at 128K on the H200 for the llama3-8b layer, 2.1× / 1.6× the torch path);
    elsewhere torch ops in chunks of query blocks. Selection: the XAttention rule, mass of the forced blocks
    counted first (`MassAfterSinkAndDiagonal`); the base then adds the sink (`block_size` tokens from
    each row's first real token) and the diagonal band, and clips to causal / padding.

    GQA: per query head (as the original, which repeats K/V; here K is never repeated — the query heads
    of a group are stacked against their KV head). Granularity: `block_size` blocks (query and key).
    `threshold` may be one value per query head (calibrated profiles; XAttention ships per-head
    tables found by dynamic programming).

    [I] choices: groups of S start at the call's first query and at key 0 (chunked prefill does not
    align them; the sample stays an antidiagonal of S pairs); padding keys are zeroed and key groups
    without a real key masked, query groups without a real query score nothing; no `norm` (1 in the
    released code). The diagonal tile's antidiagonal includes a few future pairs, as in the original
    (they score only; the executor applies the causal rule).
    """

    fast_from: ClassVar[int | None] = 32768  # H200: 1.34× SDPA cuDNN at 32K with the fused estimate (methods_h200_v3)
    selector: ClassVar = MassAfterSinkAndDiagonal("threshold")
    full_density: ClassVar[dict] = {"threshold": 1.0}
    knob: ClassVar = Knob("threshold", 0.5, 0.999, denser="higher")

    threshold: float = option(0.9, "cumulative attention mass kept per query block (τ)", min=0.0, max=1.0,
                              per_head=True)
    stride: int = option(8, "antidiagonal stride S (one antidiagonal per S×S tile)", choices=(4, 8, 16))
    block_size: int = option(128, "query and key block size in tokens (every choice is a multiple of every stride)",
                             choices=(16, 32, 64, 128))

    def dense_reason(self, q_len: int, kv_len: int, ctx: PrefillContext) -> str | None:
        if num_blocks(kv_len, self.block_size) <= 2:
            return f"input of {kv_len} keys fits in the sink and diagonal blocks ({self.block_size}-token blocks)"
        return None

    def estimate(self, query: torch.Tensor, key: torch.Tensor, ctx: PrefillContext) -> BlockScores:
        return BlockScores(antidiagonal_block_scores(query, key, ctx.scale, ctx.bounds, self.block_size, self.stride))
