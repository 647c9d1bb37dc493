"""`proxyattn`: representative (proxy) heads rank the key blocks, per-head budgets decide how many
(ProxyAttn, arXiv 2509.24745; methods.md §3)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from attnpatch.estimators.proxy import proxy_block_scores
from attnpatch.methods.base import PrefillContext
from attnpatch.methods.estimated import BlockScores, EstimatedPrefill
from attnpatch.options import Knob, option
from attnpatch.registry import register_prefill
from attnpatch.sparsity import num_blocks
from attnpatch.sparsity.regions import allowed_blocks
from attnpatch.sparsity.selectors import Threshold


@register_prefill("proxyattn")
@dataclass
class ProxyAttn(EstimatedPrefill):
    """ProxyAttn: one proxy head per GQA group ranks key blocks; each head keeps its own budget of them.

    Each GQA group's proxy head ranks key blocks; each query head keeps the top `k_{h,r}` of that
    ranking, `k_{h,r}` from the head's own concentration; plus sink and diagonal blocks.

    Block granularity (one `block_size` for queries and keys, default 128 as §3.2 suggests).
    GQA: the ranking is shared per KV group, the budget is per query head, so selections are per query
    head and nested within a group (the group's union is its largest selection).
    Choices where the paper is open ([I], methods.md §3.2):

    * proxy head = the GQA group: Q mean-pooled over the group's query heads, K the group's KV head;
    * proxy scores are computed on sampled query rows only: the last `sample` rows of every query
      block (they see the whole diagonal block and the most context), token-level softmax over the
      keys each row sees, max-pooled over those rows and the block's keys;
    * concentration signal of head `h`: the exact attention of the last row of every query block
      (the §3.2 example; over every key, not mean-pooled key blocks: a mean dilutes a single strong key
      by the block size and made a head that stares at one key look diffuse), summed per key block;
      the budget is the fewest blocks whose mass reaches `gamma`, clamped to `[min_blocks, max_blocks]`
      (`min_blocks` wins, fractions round up), ranked among the blocks the query block may see;
    * budget ties go to the lower key block; forced sink/diagonal blocks may also be in the top-k.
    * the group's ranking, not each head's: ranking each head's blocks by the larger of the proxy's and
      the head's own last-row mass (each relative to its row's best block) was measured and not kept —
      SmolLM2-135M, 4K passkey prompt, γ = 0.95: attention recall 0.949 → 0.952 at density 0.344 → 0.345.
    * the base's `dense_tail` stays off by default (the paper's selection); `dense_tail=1` keeps the last
      query block dense: SmolLM2-135M, 4K, the suite's 20 passkey prompts, CPU float32, γ = 0.95:
      15 → 19 answered at density 0.344 → 0.392 (γ = 0.98, denser at 0.443, answered 14 on the H200).
    * forced local band of 2 blocks (the diagonal and the one before), not the diagonal alone: the
      budget is set by each block's last row, and the block's first rows lost their local context.
      SmolLM2-135M, 4K tokens of Austen, γ = 0.95, block 128: density 0.421 → 0.437, attention recall
      0.925 → 0.946, output error 0.171 → 0.088 (eval.fidelity.measure).

    The budget is per (head, query block), which the base's selectors (one parameter per head) do not
    take: `estimate` returns each block's budget left, `k_{h,r} - rank`, and the base keeps those >= 1.
    Estimate cost (`S = sample`): `2 · B · Hkv · (Lq · S / bs) · Lk · d` FLOPs for the proxy and
    `2 · B · Hq · (Lq / bs) · Lk · d` for the heads' signal, both halved by clipping each chunk of query
    blocks to the keys it may see: `(Hkv · S + Hq) / (Hq · bs)` of a dense `Q·Kᵀ` (3.9 % for 32/8 heads,
    S = 16, bs = 128). On CUDA one fused Triton kernel computes the block statistics without writing the
scores (`estimators/proxy_triton.py`; temporaries `O(rows · C)`) and a second one turns them into each
head's `k_{h,r} − rank` (`estimators/proxy_budget_triton.py`: the proxy pooling, both sorts and the coverage
count in one launch); elsewhere the torch path (`O(chunk rows · Lk)`).
    """

    # H200, fused estimate (bench/results/methods_h200_v4/): llama3-8b layer 0.42× / 1.31× / 2.55× / 3.29× cuDNN
    # at 8K / 16K / 32K / 128K; qwen2.5-7b 0.35× / 1.18× / 2.27× / 3.76×.
    fast_from: ClassVar[int | None] = 16384
    full_density: ClassVar[dict] = {"min_blocks": 1 << 20, "gamma": 1.0}
    knob: ClassVar = Knob("gamma", 0.5, 0.999, denser="higher")
    selector: ClassVar = Threshold("in_budget")
    in_budget: ClassVar[float] = 1.0  # keep blocks whose budget left (k - rank) is at least one

    block_size: int = option(128, "query and key block size in tokens", choices=(16, 32, 64, 128))
    sample: int = option(16, "query rows sampled per query block (its last rows; at most block_size)", min=1)
    gamma: float | tuple[float, ...] = option(
        0.9, "coverage: each head keeps the fewest blocks holding this share of its estimated mass",
        min=0.0, max=1.0, per_head=True)
    min_blocks: float | tuple[float, ...] = option(
        2.0, "fewest top-ranked blocks a head keeps per query block (sink/diagonal come on top); wins over max_blocks",
        min=0.0, per_head=True)
    max_blocks: float | tuple[float, ...] = option(
        float(1 << 20), "most top-ranked blocks a head keeps per query block (sink/diagonal come on top)", min=0.0,
        per_head=True)
    sink_blocks: int = option(1, "key blocks kept from each sequence's first real token", min=0)
    local_blocks: int = option(2, "key blocks kept up to and including the diagonal block", min=1)

    def dense_reason(self, q_len: int, kv_len: int, ctx: PrefillContext) -> str | None:
        if num_blocks(kv_len, self.block_size) <= self.sink_blocks + self.local_blocks:
            return f"input of {kv_len} keys fits in sink+local ({self.sink_blocks}+{self.local_blocks} blocks)"
        return None

    def estimate(self, query, key, ctx: PrefillContext) -> BlockScores:
        b, hq, lq, _ = query.shape
        bs, device = self.block_size, query.device
        allowed = allowed_blocks(b, lq, key.shape[2], bs, bs, ctx.bounds, device)
        return BlockScores(proxy_block_scores(
            query, key, ctx.bounds, ctx.scale, bs, self.sample, allowed, self.head_parameter("gamma", hq, device),
            self.head_parameter("min_blocks", hq, device), self.head_parameter("max_blocks", hq, device)))
