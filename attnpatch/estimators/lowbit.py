"""Low-bit element-wise attention estimate with relative attention scores (SALE, methods.md §6).

1. Smoothing: `k̃ = k − k̄` (mean over the real keys, per KV head: softmax-invariant per row) and
   `q̃ = q − q̄` (mean over the real query rows, per query head) with the correction `c_j = q̄ · k̃_j`,
   so `q · k̃_j = q̃ · k̃_j + c_j`.
2. Symmetric per-token quantisation of `q̃` and `k̃` to `bits` (8: ±127; 4: ±7, the paper's INT4
   range); the estimate is `ŝ_ij = sq_i · sk_j · (q̂_i · k̂_j) + c_j`, the integer dot product computed
   exactly (`int_dot`).
3. Reference per row: the exact partial softmax of the row over its forced (sink + local) keys,
   `m_i = max_j q_i · k̃_j` and `l_i = Σ_j exp(σ (q_i · k̃_j − m_i))`.
4. Block score: `max over the block's visible elements of exp(σ (ŝ_ij − m_i)) / l_i`, the largest
   relative attention score, so "kept iff score > τ" is SALE's test `ŝ_ij > T_i = m_i + ln(l_i τ) / σ`
   for some element (one exp per block, not per element).

Steps 1–3 run in torch (`lowbit_operands`). Step 4 runs in the fused Triton kernel of `lowbit_triton`
where it takes the input (CUDA; the estimated scores never leave the chip), else in chunked torch ops
(temporaries `O(chunk rows · Lk)`; no `Lq × Lk` tensor), the reference.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from attnpatch.estimators import lowbit_triton
from attnpatch.estimators.visibility import real_positions, visible
from attnpatch.sparsity import KeyBounds, num_blocks

CHUNK_ELEMENTS = 1 << 26  # estimated score elements per chunk of query blocks (fp32: 256 MiB)
_EXACT_FP32 = 1 << 24  # integers below this add exactly in fp32
_BMM_OUT_DTYPE: list[bool] = []  # whether torch.bmm(..., out_dtype=) runs on this CUDA build (probed once)


def quantize(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-token (last dim) quantisation: `(int8 values in ±(2^(bits−1) − 1), [..., 1] fp32
    scale)` with `x ≈ values · scale`."""
    qmax = (1 << (bits - 1)) - 1
    scale = x.float().abs().amax(-1, keepdim=True) / qmax
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(x.float() / safe).clamp_(-qmax, qmax).to(torch.int8), scale


def int_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ b.T` of int8 tensors `[..., M, D]`, `[..., N, D]` as exact integers in fp32 `[..., M, N]`.

    One matrix pair (every leading dim 1) goes to `torch._int_mm` (INT8 in, INT32 out) where its shape
    rules allow (M > 16, D and N multiples of 8). Batched products run as bf16 tensor-core `bmm` with an
    fp32 output on CUDA (int8 values are exact in bf16, products and sums exact in fp32) and as an fp32
    matmul elsewhere (exact while `D · max|a| · max|b| < 2^24`, fp64 beyond): `torch._int_mm` is 2-D
    only, and a loop over (batch, head) pairs is what this avoids.
    """
    *lead, m, d = a.shape
    n = b.shape[-2]
    one = all(x == 1 for x in lead)
    if one and m > 16 and d % 8 == 0 and n % 8 == 0:
        out = torch._int_mm(a.reshape(m, d).contiguous(), b.reshape(n, d).contiguous().t())
        return out.float().view(*lead, m, n)
    if a.is_cuda and _bmm_out_dtype_works():
        out = torch.bmm(a.reshape(-1, m, d).to(torch.bfloat16), b.reshape(-1, n, d).to(torch.bfloat16).transpose(1, 2),
                        out_dtype=torch.float32)
        return out.view(*lead, m, n)
    exact = d * 127 * 127 < _EXACT_FP32
    dtype = torch.float32 if exact else torch.float64
    return (a.to(dtype) @ b.to(dtype).transpose(-1, -2)).float()


def _bmm_out_dtype_works() -> bool:
    if not _BMM_OUT_DTYPE:
        try:
            x = torch.ones(1, 16, 16, device="cuda", dtype=torch.bfloat16)
            torch.bmm(x, x, out_dtype=torch.float32)
            _BMM_OUT_DTYPE.append(True)
        except (RuntimeError, TypeError):
            _BMM_OUT_DTYPE.append(False)
    return _BMM_OUT_DTYPE[0]


def _forced_key_positions(forced: torch.Tensor, block: int, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`([B, R, F·bs] key positions, [B, R, F·bs] in range)` of a `[B, 1, R, C]` block mask's kept blocks
    (F = the most kept by any row; rows with fewer repeat block C, out of range)."""
    c = forced.shape[-1]
    mask = forced[:, 0]
    f = max(int(mask.sum(-1).max()) if mask.numel() else 0, 1)
    cols = torch.arange(c, device=forced.device)
    order = torch.where(mask, cols, c + cols).argsort(dim=-1)[..., :f]  # kept blocks first, ascending
    blocks = torch.where(torch.gather(mask, -1, order), order, c)
    pos = (blocks.unsqueeze(-1) * block + torch.arange(block, device=forced.device)).flatten(-2)
    return pos, pos < kv_len


class Operands(NamedTuple):
    """What the element-wise estimate reads (all contiguous): the quantised smoothed `q` `[B, Hq, Lq, D]`
    int8 and its per-row scale `q_scale` `[B, Hq, Lq]`, the same for `k` `[B, Hkv, Lk, D]` and `k_scale`
    `[B, Hkv, Lk]`, the correction `corr` `[B, Hq, Lk]` (`c_j = q̄ · k̃_j`) and each row's exact partial
    softmax over its forced keys, `m` and `log_l` `[B, Hq, Lq]` (`0, −inf` for a row that sees none)."""

    q: torch.Tensor
    q_scale: torch.Tensor
    k: torch.Tensor
    k_scale: torch.Tensor
    corr: torch.Tensor
    m: torch.Tensor
    log_l: torch.Tensor


def lowbit_operands(query: torch.Tensor, key: torch.Tensor, bounds: KeyBounds, scale: float, block: int,
                    forced: torch.Tensor, bits: int = 8, chunk_elements: int = CHUNK_ELEMENTS) -> Operands:
    """Steps 1–3 of the module docstring: smoothing, quantisation, correction, per-row reference."""
    b, hq, lq, d = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    g = hq // hkv
    real = real_positions(bounds, b, lk, query.device)  # [B, Lk]
    w = real.to(torch.float32).view(b, 1, lk, 1)
    kbar = (key.float() * w).sum(2, keepdim=True) / w.sum(2, keepdim=True).clamp(min=1)  # [B, Hkv, 1, D]
    wq = real[:, lk - lq:].to(torch.float32).view(b, 1, lq, 1)
    qbar = (query.float() * wq).sum(2, keepdim=True) / wq.sum(2, keepdim=True).clamp(min=1)  # [B, Hq, 1, D]
    k_smooth = key.float() - kbar
    kq, ks = quantize(k_smooth, bits)  # [B, Hkv, Lk, D] int8, [B, Hkv, Lk, 1]
    qq, qs = quantize(query.float() - qbar, bits)
    corr = (qbar.view(b, hkv, g, d) @ k_smooth.transpose(-1, -2)).view(b, hq, lk)  # c_j = q̄ · k̃_j
    del k_smooth
    m, log_l = _row_reference(query, key, kbar, bounds, scale, block, forced, chunk_elements)
    return Operands(qq.contiguous(), qs.view(b, hq, lq).contiguous(), kq.contiguous(),
                    ks.view(b, hkv, lk).contiguous(), corr.contiguous(), m, log_l)


def _row_reference(query: torch.Tensor, key: torch.Tensor, kbar: torch.Tensor, bounds: KeyBounds, scale: float,
                   block: int, forced: torch.Tensor, chunk_elements: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(m, log l)` `[B, Hq, Lq]`: each row's exact partial softmax over the keys of its forced blocks that
    it sees (`0, −inf` where it sees none); query blocks in chunks, temporaries `O(chunk rows · F·bs)`."""
    b, hq, lq, d = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    g = hq // hkv
    rr = num_blocks(lq, block)
    device = query.device
    fpos, fok = _forced_key_positions(forced, block, lk)  # [B, R, F·bs]
    nf = fpos.shape[-1]
    m_all = torch.zeros(b, hq, rr * block, dtype=torch.float32, device=device)
    log_l_all = torch.zeros(b, hq, rr * block, dtype=torch.float32, device=device)
    step = max(1, chunk_elements // max(1, b * hq * block * nf))
    for r0 in range(0, rr, step):
        r1 = min(rr, r0 + step)
        nr, n = r1 - r0, (r1 - r0) * block
        rows = torch.arange(r0 * block, r1 * block, device=device)
        row_ok = (rows < lq).view(1, n, 1)
        kpos = fpos[:, r0:r1]  # [B, nr, F·bs]
        keys = torch.gather(key, 2, kpos.clamp(max=lk - 1).reshape(b, 1, nr * nf, 1).expand(b, hkv, nr * nf, d))
        keys = keys.float().view(b, hkv, nr, nf, d) - kbar.view(b, hkv, 1, 1, d)
        qc = F.pad(query[:, :, r0 * block:r1 * block], (0, 0, 0, n - min(n, lq - r0 * block))).float()
        exact = torch.einsum("bkgrid,bkrjd->bkgrij", qc.view(b, hkv, g, nr, block, d), keys)
        seen = visible(bounds, rows.clamp(max=lq - 1), kpos.repeat_interleave(block, dim=1), lq, lk, b)
        seen = seen & fok[:, r0:r1].repeat_interleave(block, dim=1) & row_ok  # [B, n, F·bs]
        exact = exact.reshape(b, hq, n, nf).masked_fill(~seen.unsqueeze(1), float("-inf"))
        m = exact.amax(-1, keepdim=True)  # [B, Hq, n, 1]
        has_ref = torch.isfinite(m)
        m = torch.where(has_ref, m, torch.zeros_like(m))
        log_l = torch.where(has_ref, torch.exp(scale * (exact - m)).sum(-1, keepdim=True).log(),
                            torch.full_like(m, float("-inf")))
        m_all[:, :, r0 * block:r1 * block] = m.squeeze(-1)
        log_l_all[:, :, r0 * block:r1 * block] = log_l.squeeze(-1)
    return m_all[:, :, :lq].contiguous(), log_l_all[:, :, :lq].contiguous()


def relative_block_scores(query: torch.Tensor, key: torch.Tensor, bounds: KeyBounds, scale: float, block: int,
                          forced: torch.Tensor, bits: int = 8, chunk_elements: int = CHUNK_ELEMENTS,
                          use_kernel: bool | None = None) -> torch.Tensor:
    """`[B, Hq, R, C]` fp32: per (query block, key block) the largest estimated relative attention score
    `exp(σ (ŝ_ij − m_i)) / l_i` over the visible elements (0 where none is visible), with `m_i, l_i`
    the exact partial softmax of row `i` over the keys of its `forced` blocks (`[B, 1, R, C]`, e.g. sink +
    local band) that it sees. A row that sees none of them scores `inf` wherever it sees a key.

    The element-wise estimate runs in the fused Triton kernel (`lowbit_triton`) where it takes the input
    (`use_kernel=None`), else in chunked torch ops; `True` requires the kernel (ValueError with the reason
    it declines), `False` runs torch (the reference)."""
    reason = "not requested" if use_kernel is False else lowbit_triton.unsupported_reason(query, key, bounds, block)
    if use_kernel and reason is not None:
        raise ValueError(f"relative_block_scores: the Triton estimate declines: {reason}")
    ops = lowbit_operands(query, key, bounds, scale, block, forced, bits, chunk_elements)
    if reason is None:
        return lowbit_triton.relative_block_scores_triton(*ops, bounds=bounds, scale=scale, block=block)
    return _torch_block_scores(ops, bounds, scale, block, chunk_elements)


def _torch_block_scores(ops: Operands, bounds: KeyBounds, scale: float, block: int,
                        chunk_elements: int) -> torch.Tensor:
    """Step 4 in chunks of query blocks (temporaries `O(chunk rows · Lk)` fp32 scores; no `Lq × Lk`)."""
    qq, qs, kq, ks, corr, m_all, log_l_all = ops
    b, hq, lq, d = qq.shape
    hkv, lk = kq.shape[1], kq.shape[2]
    g = hq // hkv
    rr, cc = num_blocks(lq, block), num_blocks(lk, block)
    device = qq.device
    out = torch.zeros(b, hq, rr, cc, dtype=torch.float32, device=device)
    step = max(1, chunk_elements // max(1, b * hq * block * lk))
    for r0 in range(0, rr, step):
        r1 = min(rr, r0 + step)
        nr, n = r1 - r0, (r1 - r0) * block
        rows = torch.arange(r0 * block, r1 * block, device=device)
        row_ok = (rows < lq).view(1, n, 1)
        rows = rows.clamp(max=lq - 1)
        m, log_l = m_all[:, :, rows, None], log_l_all[:, :, rows, None]  # [B, Hq, n, 1]
        kend = min(lk, lk - lq + min(r1 * block, lq))
        cend = num_blocks(kend, block)
        est = int_dot(qq[:, :, rows].reshape(b, hkv, g * n, d), kq[:, :, :kend]).view(b, hkv, g, n, kend)
        est = est * qs[:, :, rows].view(b, hkv, g, n, 1) * ks[:, :, :kend].view(b, hkv, 1, 1, kend)
        est = est.view(b, hq, n, kend) + corr[:, :, None, :kend]
        rel = scale * (est - m) - log_l
        rel = F.pad(rel, (0, cend * block - kend))
        vis = visible(bounds, rows, torch.arange(cend * block, device=device), lq, lk, b) & row_ok
        rel = rel.masked_fill(~vis.unsqueeze(1), float("-inf"))
        best = rel.view(b, hq, nr, block, cend, block).amax(dim=(3, 5))
        out[:, :, r0:r1, :cend] = torch.exp(best)
    return out
