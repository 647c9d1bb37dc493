"""`s2o`: S2O-style importance-ordered token selection with an early stop (arXiv 2602.22575; design [I])."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from attnpatch.estimators.pooled import pool_queries
from attnpatch.estimators.token_mass import block_token_mass
from attnpatch.methods.base import DenseFallback, PrefillContext, PrefillMethod
from attnpatch.options import Knob, option, per_head
from attnpatch.registry import register_prefill
from attnpatch.sparsity import num_blocks
from attnpatch.sparsity.regions import query_block_span
from attnpatch.sparsity.tokens import (
    CountedTokenSelection,
    block_key_mask,
    compact_mask,
    forced_key_mask,
    pad_lists,
    real_keys,
)

_CHUNK_ELEMS = 1 << 26  # pooled-score elements per chunk of query blocks


@register_prefill("s2o")
@dataclass
class S2OPrefill(PrefillMethod):
    """S2O: keys in descending estimated importance, in virtual blocks, until the mass left out is below τ.

    Per query block: sink + local keys first, then the other keys in descending estimated importance,
    cut into virtual blocks of `block_size` tokens, stopping once the estimated attention mass left
    outside falls below τ. Token granularity (`TokenSelection`, executed by the gather kernels); per
    query head (GQA: K read per KV head, never repeated; no sharing across a group).

    Only S2O's abstract is public (methods.md §2): every step below is our choice [I].

    1. Estimate [I]: mean-pooled queries over sub-blocks of `pool_size` rows (real rows only), then
       `p̂_bj = softmax_j(σ q̄_b·k_j)` over the keys the sub-block's last row may see, and the importance
       of key `j` for the block `I_j = mean_b p̂_bj` (estimators/token_mass.py): an estimated share of
       the block's attention, summing to 1 over visible keys.
    2. Forced first [I]: `sink_blocks · block_size` keys from each row's first real key, and the local
       band (the `local_blocks · block_size` keys before the block's first query plus the block's own
       keys up to its last query). Their estimated mass F is counted as already covered.
    3. Online permutation [I]: the other visible keys sorted by `I_j` (top-k, capped), cut into virtual
       blocks of `block_size` consecutive entries of that order (the "page table").
    4. Early stop [I]: virtual block `t` is kept while the estimated residual mass before it,
       `1 − F − Σ_{earlier blocks} I`, is at least τ (per query head, relative to the block's estimated
       total); the first block whose residual is below τ and all after it are dropped. The stop is
       decided at selection time from the estimate — equivalent to stopping the kernel there, since
       the estimated masses are known before it runs — and the kept keys are listed in ascending
       order (the gather kernels want them so; the order does not change the exact result).
    5. Bounds [I]: at most `max_keys` keys per query block (forced keys count first; with the cap the
       top-k sort is `min(L, max_keys)` wide), so memory is O(L · max_keys / block_size), not O(L²).

    Cost: O(L² · d / pool_size) multiply-adds for the estimate (causal half only), plus a softmax and
    a top-`max_keys` selection over `L` keys for every (head, query block); chunked over query blocks
    (temporaries ~`_CHUNK_ELEMS` floats). τ = 0 keeps every key (full density).
    """

    # H200: 0.28× / 0.29× / 0.37× SDPA cuDNN at 32K / 64K / 128K (methods_h200_v2)
    fast_from: ClassVar[int | None] = None
    granularity: ClassVar[str] = "token"
    full_density: ClassVar[dict] = {"tau": 0.0, "max_keys": 1 << 30}
    knob: ClassVar = Knob("tau", 1e-3, 0.5, denser="lower", log=True)

    block_size: int = option(128, "query block and virtual key block size in tokens", choices=(16, 32, 64, 128))
    pool_size: int = option(32, "query rows averaged into one pooled query (at most block_size)",
                            choices=(8, 16, 32, 64, 128))
    tau: float = option(0.05, "early stop: drop the remaining virtual blocks once their estimated "
                        "attention mass is below τ", min=0.0, max=1.0, per_head=True)
    sink_blocks: int = option(1, "block_size-token blocks kept from each row's first real key", min=0)
    local_blocks: int = option(1, "block_size-token blocks kept before each query block (besides the "
                               "block's own keys)", min=0)
    max_keys: int = option(16384, "most keys listed per query block (bounds memory and the sort)", min=1)

    def __post_init__(self) -> None:
        forced = (self.sink_blocks + self.local_blocks + 1) * self.block_size
        if self.max_keys < forced:
            raise ValueError(f"option 'max_keys' of prefill method 's2o' must be at least the sink + local "
                             f"keys of a block ({forced}), got {self.max_keys}")

    def dense_reason(self, q_len: int, kv_len: int) -> str | None:
        forced = (self.sink_blocks + self.local_blocks + 1) * self.block_size
        if kv_len <= forced:
            return f"input of {kv_len} keys fits in the sink and local keys ({forced})"
        return None

    def select(self, query: torch.Tensor, key: torch.Tensor, ctx: PrefillContext):
        b, hq, lq, _ = query.shape
        lk = key.shape[2]
        reason = self.dense_reason(lq, lk)
        if reason is not None:
            return DenseFallback(reason)
        device, bounds, bq = query.device, ctx.bounds, self.block_size
        off = lk - lq
        pool = min(self.pool_size, bq)
        m = bq // pool  # pooled sub-blocks per query block
        n_r = num_blocks(lq, bq)
        real = real_keys(bounds, b, lk, device)
        qbar, rows = pool_queries(query, pool, None if real is None else real[:, off:])
        extra = n_r * m - qbar.shape[2]  # sub-blocks past the last query (ragged last block): empty
        qbar, rows = F.pad(qbar, (0, 0, 0, extra)), F.pad(rows, (0, extra))
        sub_last = off + ((torch.arange(n_r * m, device=device) + 1) * pool).clamp(max=lq) - 1
        _, last_q = query_block_span(lq, lk, bq, device)
        tau = per_head(self.tau, hq, device).view(1, hq, 1, 1)
        sink, local = self.sink_blocks * bq, self.local_blocks * bq
        cand_cap = self.max_keys - (self.sink_blocks + self.local_blocks + 1) * bq
        chunk = max(1, _CHUNK_ELEMS // max(1, b * hq * m * lk))
        parts = []
        for r0 in range(0, n_r, chunk):
            r1 = min(n_r, r0 + chunk)
            keys = min(lk, off + min(r1 * bq, lq))  # keys past the chunk's last query are never visible
            imp = block_token_mass(qbar[:, :, r0 * m:r1 * m], rows[:, :, r0 * m:r1 * m], key, ctx.scale,
                                   sub_last[r0 * m:r1 * m], m, bounds, keys)  # [B, Hq, n, keys]
            forced = forced_key_mask(bounds, b, lq, lk, bq, r0, r1, sink, local, keys, device)
            cand = block_key_mask(bounds, b, lq, lk, bq, r0, r1, keys, device) & ~forced
            if real is not None:
                cand = cand & real[:, :keys].view(b, 1, 1, keys)
            keep = self._ordered_prefix(imp, forced, cand, tau, min(cand_cap, keys)) | forced
            parts.append(compact_mask(keep))
        indices, counts = pad_lists(parts)
        return CountedTokenSelection(indices, counts, bq, lq, lk)

    def _ordered_prefix(self, imp: torch.Tensor, forced: torch.Tensor, cand: torch.Tensor, tau: torch.Tensor,
                        width: int) -> torch.Tensor:
        """`[B, Hq, n, keys]` bool: the leading virtual blocks of the candidates in descending importance,
        up to the early stop (see the class docstring, steps 3–4)."""
        if width <= 0:
            return torch.zeros_like(cand).expand(imp.shape)
        bk = self.block_size
        total = imp.sum(-1, keepdim=True)
        covered = (imp * forced).sum(-1, keepdim=True)
        vals, order = imp.masked_fill(~cand, -1.0).topk(width, dim=-1)  # descending; non-candidates last
        n_cand = cand.sum(-1, keepdim=True)  # [B|1, 1, n, 1]
        taken = vals.clamp(min=0).cumsum(-1)
        n_virtual = -(-width // bk)
        before = F.pad(taken[..., bk - 1::bk], (1, 0))[..., :n_virtual]  # mass taken before virtual block t
        residual = (total - covered - before).clamp(min=0)
        t = torch.arange(n_virtual, device=imp.device)
        kept_blocks = ((residual >= tau * total) & (t * bk < n_cand)).sum(-1, keepdim=True)
        kept = torch.minimum(kept_blocks * bk, torch.minimum(n_cand, torch.tensor(width, device=imp.device)))
        chosen = torch.arange(width, device=imp.device) < kept
        return torch.zeros(imp.shape, dtype=torch.bool, device=imp.device).scatter_(-1, order, chosen)
