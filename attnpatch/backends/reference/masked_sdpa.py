"""Block-sparse attention on the CPU as chunks of boolean token masks through torch SDPA.

The reference executor (`executors.block_sparse_attention`) gathers each query block's key blocks and runs
its softmax as separate float32 passes. On a CPU those passes cost far more than the arithmetic. This path
expands the block selection into a token mask for a chunk of query rows, joins it with causality, padding and
the window, and calls SDPA with that mask. The arithmetic is that of dense SDPA: every key up to the causal
limit is computed. Building the masks, and SDPA's conversion of them to float, add the rest.

Measured on the idle 2-core CPU: one SmolLM2 layer at 4K tokens (9 / 3 heads, d 64), `proxyattn` with
`dense_tail=1` (whose tail row widens every gather to the full row). This path took 0.32–0.45 s, the gather
0.94–1.02 s, and dense SDPA 0.10 s. The result is exact up to float rounding. Rows that see no key return 0,
as the reference does.

Memory: one `[B, Hq, rows, Lk]` boolean mask per chunk, with `rows` chosen to keep it under `CHUNK_BYTES`. No
L×L tensor is built at once. This is a CPU path only: on a GPU the Triton and flash-attn-4 kernels run the
selections.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnpatch.sparsity import BlockSelection, KeyBounds, num_blocks

CHUNK_BYTES = 16 * 2**20  # the token mask of one chunk of query rows (smaller chunks: less above the diagonal)


def unsupported_reason(query: torch.Tensor, selection: BlockSelection, return_lse: bool = False) -> str | None:
    """Why this path does not take the call (None when it does): the reference executor runs it."""
    if query.device.type != "cpu":
        return f"device {query.device} (a CPU path)"
    if selection.skip is not None:
        return "skip rules (BLASST's run-time skips are emulated by the reference executor)"
    if return_lse:
        return "log-sum-exp requested"
    return None


def masked_sdpa_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, selection: BlockSelection,
                          scale: float, bounds: KeyBounds | None = None) -> torch.Tensor:
    """Causal attention of each query block over its selected key blocks (`[B, Hq, Lq, D]` in the query's dtype),
    as `executors.block_sparse_attention` computes it: query `[B, Hq, Lq, D]`, key / value `[B, Hkv, Lk, D]`,
    queries aligned to the end of the keys; `bounds`: padding, window or a tensor mask."""
    b, hq, lq, _ = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    bq, bk = selection.block_q, selection.block_k
    bounds = bounds or KeyBounds()
    heads = selection.counts.shape[1]
    per_row = b * max(hq, heads) * lk
    chunk_blocks = max(1, CHUNK_BYTES // max(1, per_row * bq))
    out = torch.empty(b, hq, lq, value.shape[-1], dtype=query.dtype, device=query.device)
    block_mask = selection.to_block_mask()  # [B, H, R, C]: blocks, not tokens
    for r0 in range(0, num_blocks(lq, bq), chunk_blocks):
        t0, t1 = r0 * bq, min(lq, (r0 + chunk_blocks) * bq)
        kend = lk - lq + t1  # keys past the chunk's last query are never seen: not computed
        blocks = block_mask[:, :, r0:num_blocks(t1, bq)]
        rows = torch.arange(t0, t1, device=query.device)
        kpos = torch.arange(kend, device=query.device).view(1, 1, 1, -1)
        allowed = blocks[:, :, (rows // bq - r0).view(-1, 1), kpos.view(1, -1) // bk]  # one gather: [B, H, rows, keys]
        qpos = (lk - lq + rows).view(1, 1, -1, 1)
        if bounds.mask is not None:
            seen = bounds.mask[:, :, t0:t1, :kend].to(torch.bool) & (kpos <= qpos)
        else:
            seen = bounds.visible(qpos, kpos, b)
        allowed = allowed & seen
        part = F.scaled_dot_product_attention(query[:, :, t0:t1], key[:, :, :kend], value[:, :, :kend],
                                              attn_mask=allowed, scale=scale, enable_gqa=hq != hkv)
        # a row that sees no key: 0 (torch >= 2.5 on the CPU; NaN from older math paths)
        out[:, :, t0:t1] = torch.nan_to_num(part, nan=0.0).to(query.dtype)
    return out
