"""`sale`: low-bit element-wise estimate judged against the sink + local partial softmax (SALE,
arXiv 2505.24179; methods.md §6)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from attnpatch.estimators.lowbit import relative_block_scores
from attnpatch.methods.base import PrefillContext
from attnpatch.methods.estimated import BlockScores, EstimatedPrefill
from attnpatch.options import Knob, option
from attnpatch.registry import register_prefill
from attnpatch.sparsity import num_blocks
from attnpatch.sparsity.regions import forced_blocks
from attnpatch.sparsity.selectors import Threshold


@register_prefill("sale")
@dataclass
class Sale(EstimatedPrefill):
    """SALE: keep key blocks whose low-bit estimated relative attention score exceeds the head's τ.

    Keep a key block when some estimated element's relative attention score
    `exp(σ (ŝ_ij − m_i)) / l_i` exceeds the head's `tau`: `ŝ` a low-bit estimate of `q · k̃`, `m_i, l_i`
    the exact partial softmax of row `i` over its sink + local keys; sink and local band always kept.

    Per query head (as the paper: K smoothed and quantised once per KV head, `q̄` per query head; the
    query heads of a group are stacked against their shared K, never repeated). Block granularity.

    Choices and differences from the paper's kernel (methods.md §6):

    * INT8, not INT4: Hopper has no INT4 tensor cores. Per-token symmetric INT8 (±127) of the smoothed
      Q and K by default; `bits=4` quantises to the paper's ±7 range (still computed in INT8). On CUDA
      the element-wise estimate is one fused Triton kernel (`estimators/lowbit_triton.py`): per (head,
      query block) INT8 × INT8 → INT32 `tl.dot` (exact) over the key blocks up to the diagonal, scaled,
      masked and reduced to the block's largest relative score in registers; no score reaches memory.
      Head dims 16–256, block sizes 16–128, causal + left padding + sliding window; other inputs (a
      tensor mask, per-key validity, CPU) run the chunked torch reference, whose integer products are
      exact too (`int_dot`) but which writes each chunk's fp32 scores and passes over them several times.
      Quantisation and the sink + local partial softmax stay in torch in both (O(L · forced keys)).
    * One block size for queries and keys, 64: the paper's query block (the OR over 64 rows that decides
      a key block is the same); its 32-key blocks become 64-key blocks, so a kept block carries up to
      32 more keys (density somewhat higher at the same τ) and block lists match the backends' tiles.
    * Threshold in natural log: `T_i = m_i + ln(l_i τ) / σ` on raw scores (the paper's log2 form with
      σ₂ = σ log2 e is the same test). Two-pass (the paper's default): `T_i` is fixed by sink + local
      and not raised as kept blocks accumulate, so the segment order (128-key segments) plays no part.
    * Sink = `sink_blocks` blocks from each row's first real token; local = the `ceil(local_window /
      block_size)` blocks ending at the diagonal block (128 keys ending at the query block's last row, as
      the paper's band), both also the exact reference of every row (the keys of them the row sees).
    * `tau = 0` keeps every block of that head (the paper: dense head); inputs of at most `min_length`
      keys run dense (the paper: 1024 tokens). A row with no sink/local key visible keeps every key it sees.
    """

    # H200: 0.37× / 0.44× / 0.49× SDPA cuDNN at 32K / 64K / 128K (methods_h200_v2)
    fast_from: ClassVar[int | None] = None
    full_density: ClassVar[dict] = {"tau": 0.0, "min_length": 0}
    knob: ClassVar = Knob("tau", 1e-5, 0.5, denser="lower", log=True)
    selector: ClassVar = Threshold("tau")

    tau: float | tuple[float, ...] = option(
        0.004, "keep a block when an estimated element's weight relative to the sink+local softmax exceeds "
        "this (per head; 0 keeps all)", min=0.0, per_head=True)
    bits: int = option(8, "estimate precision: 8 (INT8) or 4 (the paper's INT4 range, computed in INT8)",
                       choices=(4, 8))
    block_size: int = option(64, "query and key block size in tokens", choices=(16, 32, 64, 128))
    local_window: int = option(128, "tokens of the local band ending at the diagonal (rounded up to blocks)",
                               min=1)
    sink_blocks: int = option(1, "key blocks kept from each sequence's first real token", min=0)
    min_length: int = option(1024, "inputs of at most this many keys run dense", min=0)

    @property
    def local_blocks(self) -> int:
        return max(1, num_blocks(self.local_window, self.block_size))

    def dense_reason(self, q_len: int, kv_len: int, ctx: PrefillContext) -> str | None:
        if kv_len <= self.min_length:
            return f"input of {kv_len} keys is at most min_length={self.min_length}"
        if num_blocks(kv_len, self.block_size) <= self.sink_blocks + self.local_blocks:
            return f"input of {kv_len} keys fits in sink+local ({self.sink_blocks}+{self.local_blocks} blocks)"
        return None

    def estimate(self, query, key, ctx: PrefillContext) -> BlockScores:
        b, _, lq, _ = query.shape
        lk, bs = key.shape[2], self.block_size
        forced = forced_blocks(b, lq, lk, bs, bs, ctx.bounds, self.sink_blocks, self.local_blocks, query.device)
        return BlockScores(relative_block_scores(query, key, ctx.bounds, ctx.scale, bs, forced, self.bits))
