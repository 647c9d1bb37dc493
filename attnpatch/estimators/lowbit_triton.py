"""Fused Triton kernel for step 4 of the low-bit estimate (`attnpatch.estimators.lowbit`): the largest
relative attention score of every (query block, key block), without writing the scores to memory.

One program per (batch · query head, query block `r`) walks the key blocks from the first one its rows
may see to the diagonal block (about half the square in all): the int8 Q rows of block `r` stay in
registers, each int8 K block (of KV head `h // group`, read in place) goes through `tl.dot` int8 × int8
→ int32 (exact), then `ŝ = dot · sq_i · sk_j + c_j`, masked to the visible keys, max over the block's
keys per row, `σ (max − m_i) − log l_i` per row (monotone in `ŝ`, so the same as per element), max over
the rows, `exp`, one float stored per block. Blocks never visited keep 0 (nothing visible there).

Head dims below 32 (the GPU's int8 `tl.dot` needs K ≥ 32) multiply in fp16 with fp32 accumulation,
exact too (`|values| ≤ 127`, sums below 2^24). Visibility is a key range per row: causal, left padding
(`key_start`) and sliding window; other bounds (`key_valid`, a tensor mask) are declined.
"""

from __future__ import annotations

import torch

from attnpatch.backends.triton.utils import (
    is_interpreted,
    on_input_device,
    tensor_device_ok,
    triton_available,
)
from attnpatch.sparsity import KeyBounds, num_blocks

__all__ = ["ALLOWED_BLOCKS", "ALLOWED_HEAD_DIMS", "relative_block_scores_triton", "unsupported_reason"]

ALLOWED_HEAD_DIMS = (16, 32, 64, 128, 256)  # 64 and 128 in production; 16/32 for small tests
ALLOWED_BLOCKS = (16, 32, 64, 128)  # query block = key block (`sale`'s block_size choices)


def launch_config(head_dim: int, block: int) -> tuple[int, int]:
    """`(num_warps, num_stages)`: not tuned yet, to be measured on the GPU."""
    return (8 if block >= 128 else 4), (2 if head_dim >= 256 else 3)


def unsupported_reason(query: torch.Tensor, key: torch.Tensor, bounds: KeyBounds, block: int) -> str | None:
    """Why the kernel cannot score these inputs (None when it can): the caller runs the torch path."""
    if not triton_available():
        return "triton is not installed"
    if not tensor_device_ok(query, _KERNEL_INTERPRETED) or key.device != query.device:
        return f"device {query.device} (need CUDA, or CPU with TRITON_INTERPRET=1 set before import)"
    if query.shape[-1] not in ALLOWED_HEAD_DIMS:
        return f"head dim {query.shape[-1]} not supported; allowed: {ALLOWED_HEAD_DIMS}"
    if block not in ALLOWED_BLOCKS:
        return f"block size {block} not supported; allowed: {ALLOWED_BLOCKS}"
    if query.shape[1] % key.shape[1]:
        return f"{query.shape[1]} query heads are not a multiple of {key.shape[1]} KV heads"
    if bounds.mask is not None:
        return "a tensor mask (not a key range per row)"
    if bounds.key_valid is not None:
        return "per-key validity key_valid (not a key range per row)"
    if query.shape[2] > key.shape[2]:
        return f"more queries ({query.shape[2]}) than keys ({key.shape[2]})"
    return None


if triton_available():
    import triton
    import triton.language as tl

    # `tl.reduce` with the combine `tl.max` uses, not `tl.max`: see backends/triton/combine.py
    # (library @jit helpers cannot run under the interpreter when triton was imported before it was set).
    from attnpatch.backends.triton.combine import MAX_COMBINE as _MAX

    @triton.jit
    def _lowbit_block_scores_kernel(
        Q, QS, K, KS, Corr, M, LogL, KeyStart, Out,
        n_q_heads, group, q_len, kv_len, n_qblocks, n_kblocks, window, scale,
        HEAD_D: tl.constexpr, BLOCK: tl.constexpr, INT8_DOT: tl.constexpr,
    ):  # fmt: skip
        pid_bh = tl.program_id(0)
        r = n_qblocks - 1 - tl.program_id(1)  # late query blocks visit the most key blocks: start them first
        bh = pid_bh.to(tl.int64)
        b = bh // n_q_heads
        bk = b * (n_q_heads // group) + (bh % n_q_heads) // group  # (batch, KV head) of this query head
        offset = kv_len - q_len

        offs_m = r * BLOCK + tl.arange(0, BLOCK)
        row_ok = offs_m < q_len
        offs_d = tl.arange(0, HEAD_D)
        row_idx = bh * q_len + offs_m
        q = tl.load(Q + row_idx[:, None] * HEAD_D + offs_d[None, :], mask=row_ok[:, None], other=0)
        if not INT8_DOT:
            q = q.to(tl.float16)
        q_scale = tl.load(QS + row_idx, mask=row_ok, other=0.0)
        m_row = tl.load(M + row_idx, mask=row_ok, other=0.0)
        log_l = tl.load(LogL + row_idx, mask=row_ok, other=0.0)

        # each row's visible keys [lo, hi]: padding and window below, the causal rule above
        first = tl.load(KeyStart + b)
        q_pos = offs_m + offset
        lo = tl.maximum(q_pos - window + 1, first)
        hi = tl.where(row_ok, q_pos, -1)
        k_lo = tl.maximum(r * BLOCK + offset - window + 1, first)
        k_hi = tl.minimum(r * BLOCK + BLOCK, q_len) - 1 + offset
        c_start = tl.maximum(k_lo, 0) // BLOCK
        c_end = k_hi // BLOCK + 1

        out_row = Out + (bh * n_qblocks + r) * n_kblocks
        for c in range(c_start, c_end):
            offs_n = c * BLOCK + tl.arange(0, BLOCK)
            key_ok = offs_n < kv_len
            key_idx = bk * kv_len + offs_n
            k = tl.load(K + key_idx[:, None] * HEAD_D + offs_d[None, :], mask=key_ok[:, None], other=0)
            if INT8_DOT:
                dot = tl.dot(q, tl.trans(k), out_dtype=tl.int32).to(tl.float32)
            else:
                dot = tl.dot(q, tl.trans(k.to(tl.float16)), out_dtype=tl.float32)
            k_scale = tl.load(KS + key_idx, mask=key_ok, other=0.0)
            corr = tl.load(Corr + bh * kv_len + offs_n, mask=key_ok, other=0.0)
            est = dot * q_scale[:, None] * k_scale[None, :] + corr[None, :]
            seen = (offs_n[None, :] >= lo[:, None]) & (offs_n[None, :] <= hi[:, None])
            row_best = tl.reduce(tl.where(seen, est, float("-inf")), 1, _MAX)
            # log relative score of the row's best key (+inf for a row without reference: log l = −inf);
            # a row that sees no key here gives −inf (its −inf is kept out of the arithmetic: no NaN)
            sees = row_best > float("-inf")
            rel = scale * (tl.where(sees, row_best, m_row) - m_row) - log_l
            rel = tl.where(sees, rel, float("-inf"))
            tl.store(out_row + c, tl.exp(tl.reduce(rel, 0, _MAX)))

    _KERNEL_INTERPRETED = is_interpreted(_lowbit_block_scores_kernel)
else:
    _KERNEL_INTERPRETED = False


@on_input_device
def relative_block_scores_triton(q: torch.Tensor, q_scale: torch.Tensor, k: torch.Tensor, k_scale: torch.Tensor,
                                 corr: torch.Tensor, m: torch.Tensor, log_l: torch.Tensor, *, bounds: KeyBounds,
                                 scale: float, block: int) -> torch.Tensor:
    """`[B, Hq, R, C]` fp32 block scores from the estimate's operands (`lowbit.Operands`: int8 `q`
    `[B, Hq, Lq, D]`, `k` `[B, Hkv, Lk, D]`, fp32 `q_scale, m, log_l` `[B, Hq, Lq]`, `k_scale`
    `[B, Hkv, Lk]`, `corr` `[B, Hq, Lk]`), equal to `lowbit.relative_block_scores`'s torch path.
    Raises ValueError on inputs the kernel declines (`unsupported_reason`)."""
    reason = unsupported_reason(q, k, bounds, block)
    if reason is not None:
        raise ValueError(f"relative_block_scores_triton: {reason}")
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    rr, cc = num_blocks(lq, block), num_blocks(lk, block)
    out = torch.zeros(b, hq, rr, cc, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    if bounds.key_start is not None:
        key_start = bounds.key_start.to(device=q.device, dtype=torch.int32).expand(b).contiguous()
    else:
        key_start = torch.zeros(b, dtype=torch.int32, device=q.device)
    window = lk if bounds.window is None else min(int(bounds.window), lk)
    warps, stages = launch_config(d, block)
    _lowbit_block_scores_kernel[(b * hq, rr)](
        q.contiguous(), q_scale.float().contiguous(), k.contiguous(), k_scale.float().contiguous(),
        corr.float().contiguous(), m.float().contiguous(), log_l.float().contiguous(), key_start, out,
        hq, hq // hkv, lq, lk, rr, cc, window, float(scale),
        HEAD_D=d, BLOCK=block, INT8_DOT=d >= 32, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out
