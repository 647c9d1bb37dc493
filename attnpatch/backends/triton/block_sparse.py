# ruff: noqa: SIM108  (constexpr if/else blocks in @triton.jit code are kept explicit)
"""Block-sparse FlashAttention forward (prefill) in Triton: executes a given `BlockSelection`.

The kernel is policy-free: it visits, for every (batch, query head, query block), exactly the key
blocks listed in the selection, in ascending order, with an exp2-based online softmax and fp32
accumulation. Queries are aligned to the end of the keys (causal offset `Lk - Lq`, chunked
prefill). Only key blocks that straddle the causal diagonal or run past `Lk` get masked.

Grid: one program per (batch · query head, query block); heavy (late) query blocks are launched
first. GQA is native: a program reads the K/V of its query head's KV head in place (no repeat).

Resumable state `(m, l, acc)`, per query row (float32):

* ``m``   running maximum of the *scaled natural-log* scores ``scale · q·k`` seen so far
  (``-inf`` for a row that has seen no key yet);
* ``l``   running ``Σ exp(scale · q·k − m)``;
* ``acc`` un-normalised ``Σ exp(scale · q·k − m) · v``, shape ``[B, Hq, Lq, Dv]``.

So ``lse = m + log(l)`` and ``out = acc / l``. Internally the kernel works in base 2
(``m₂ = m · log2(e)``) and converts at load/store time.

Skip-threshold mode (BLASST, arXiv 2512.12087): a visited tile (one query block × one selected
key block) is skipped — no exp, no P·V, no update of ``m``/``l``/``acc`` — when for every query
row of the tile ``tile_row_max − running_row_max < skip_bound``, on scaled scores ``scale · q·k``
(the one convention of `attnpatch.sparsity.SkipRule`: ``skip_bound = ln λ``). Rows that
cannot vote: rows past ``Lq`` (padding) and rows that have no visible key inside the tile
(causal / ``Lk`` masking). A row whose running max is ``-inf`` always vetoes (difference
``+inf``), so the first tile a row block visits is never skipped unless resumed from a state.
`attnpatch.backends.reference.block_sparse_attention_tiled_reference` is the PyTorch oracle with the
same rule and tile order.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch

from attnpatch.backends.inputs import KERNEL_HEAD_DIMS, qkv_reason
from attnpatch.backends.partial_state import check_state, pack_results
from attnpatch.backends.skip_bound import bound_per_head
from attnpatch.backends.triton.utils import (
    fp32_tiles_reason,
    is_interpreted,
    on_input_device,
    tensor_device_ok,
    triton_available,
    with_contiguous_last_dim,
)
from attnpatch.sparsity import BlockSelection, KeyBounds, num_blocks
from attnpatch.sparsity.split import mask_free_prefix

__all__ = [
    "ALLOWED_BLOCK_SIZES",
    "ALLOWED_HEAD_DIMS",
    "block_sparse_attention_triton",
    "launch_config",
    "unsupported_reason",
]

ALLOWED_HEAD_DIMS = KERNEL_HEAD_DIMS
ALLOWED_BLOCK_SIZES = (16, 32, 64, 128)  # 64 and 128 are the production sizes; 16/32 for small tests
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634

# (num_warps, num_stages) keyed by head_dim, then by (block_q, block_k) = the kernel's tile.
# Shared memory per CTA ≈ Q tile + stages × (K tile + V tile); the 128×128 tiles at D=128 use two
# stages to stay below the 227 KiB of an H100/H200 SM. To be re-tuned on the GPU.
_LAUNCH_CONFIGS: dict[int, dict[tuple[int, int], tuple[int, int]]] = {
    128: {(64, 64): (4, 3), (64, 128): (8, 2), (128, 64): (8, 3), (128, 128): (8, 2)},
    64: {(64, 64): (4, 3), (64, 128): (4, 3), (128, 64): (4, 3), (128, 128): (8, 3)},
    32: {(64, 64): (4, 3), (64, 128): (4, 3), (128, 64): (4, 3), (128, 128): (8, 3)},
    16: {(64, 64): (4, 3), (64, 128): (4, 3), (128, 64): (4, 3), (128, 128): (8, 3)},
    # D=256: 128×64 kernel tiles (`_SUB_TILES`), one stage (two are out of shared memory on an H200):
    # 0.55 of cuDNN at density 1, 0.48 per kept block at 0.1 (bench/results/tune_d256_gemma3-12b.json).
    256: {(64, 64): (4, 2), (64, 128): (4, 1), (128, 64): (8, 1), (128, 128): (8, 1)},
}


# Sub-tiles (rows per program, keys per inner step) for a selection's (block_q, block_k), keyed by
# head dim. A 128×128 selection block runs as SUB_M×SUB_N kernel tiles. Skip mode and tile counting
# always use whole blocks (the BLASST tile is the selection block).
_SUB_TILES: dict[int, dict[tuple[int, int], tuple[int, int]]] = {
    256: {(64, 128): (64, 64), (128, 128): (128, 64)},
}
# Fold the softmax scale into Q (rounded to the input dtype) instead of scaling every score tile.
# Off: no measurable gain on the H200 (23.22 vs 23.19 ms at 32K, bench/results/ablate.json).
_PRESCALE_Q = False
# Mask-free prefix per list computed in the kernel instead of by ~15 torch ops on the host. On:
# 8K llama layer d=0.1 0.362 → 0.214 ms, d=0.02 0.417 → 0.166 ms, 32K d=1 17.96 → 17.65 ms, never
# slower (H200, bench/results/host_overhead.json). With `key_start` the host path is used.
_FULL_IN_KERNEL = True
# Main-loop variant: 0 = load the key-block index in place; 1 = load it one iteration ahead;
# 2 = 1 + K/V tiles through Hopper's tensor-memory accelerator (TMA descriptors: the tile address is
# a coordinate, so the indirect block index no longer stalls the load pipeline). Measured on the
# H200 (32K, bf16, bench/results/variants.json): llama3-8b layer at density 1, 0.66 / 0.74 / 0.83 of
# cuDNN per kept block for variants 0-2; TMA + Triton's warp specialisation (variant 3 in that file,
# since removed) reached 0.73.
# Default: 2 on CUDA devices of compute capability >= 9 for head dims 64/128 in fp16/bf16, else 1.
# ATTNPATCH_BS_VARIANT overrides it (tuning).
_VARIANT_ENV = os.environ.get("ATTNPATCH_BS_VARIANT")
VARIANTS = (0, 1, 2)
_TMA_HEAD_DIMS = (64, 128)
# TMA variants' (num_warps, num_stages) and sub-tiles, from bench/results/tune_variant2*.json.
_TMA_LAUNCH_CONFIGS: dict[int, tuple[int, int]] = {128: (8, 3), 64: (4, 3)}
_TMA_SUB_TILES: dict[int, dict[tuple[int, int], tuple[int, int]]] = {64: {(128, 128): (128, 64)}}


def default_variant(device: torch.device, head_dim: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """The main-loop variant used when the caller names none (see `_VARIANT_ENV`): the TMA loop for
    16-bit inputs on Hopper or newer (float32 keeps the measured pointer-load loop)."""
    if _VARIANT_ENV is not None:
        return int(_VARIANT_ENV)
    if (device.type == "cuda" and head_dim in _TMA_HEAD_DIMS and dtype != torch.float32
            and torch.cuda.get_device_capability(device)[0] >= 9):
        return 2
    return 1


def launch_config(head_dim: int, block_q: int, block_k: int, dtype: torch.dtype = torch.float16) -> tuple[int, int]:
    """`(num_warps, num_stages)` for a head dim, tile and input dtype (no autotuning)."""
    warps, stages = _LAUNCH_CONFIGS.get(head_dim, {}).get((block_q, block_k), (4, 2))
    if dtype == torch.float32:  # fp32 tiles are twice the size: no software pipelining
        stages = 1
    return warps, stages


def sub_tiles(head_dim: int, block_q: int, block_k: int) -> tuple[int, int]:
    """`(SUB_M, SUB_N)` kernel tile for a selection block (whole block unless tuned otherwise)."""
    return _SUB_TILES.get(head_dim, {}).get((block_q, block_k), (block_q, block_k))


def unsupported_reason(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, selection: BlockSelection
) -> str | None:
    """Why the Triton kernel cannot run these inputs (None when it can): the caller falls back."""
    if not triton_available():
        return "triton is not installed"
    reason = qkv_reason(query, key, value, selection, ALLOWED_HEAD_DIMS, _DTYPES)
    if reason is not None:
        return reason
    b, hq, lq, d = query.shape
    lk = key.shape[2]
    if not tensor_device_ok(query, _KERNEL_INTERPRETED):
        return f"device {query.device} (need CUDA, or CPU with TRITON_INTERPRET=1 set before import)"
    if (why := fp32_tiles_reason(query)) is not None:
        return why
    if selection.block_q not in ALLOWED_BLOCK_SIZES or selection.block_k not in ALLOWED_BLOCK_SIZES:
        return f"blocks {selection.block_q}×{selection.block_k} not supported; allowed: {ALLOWED_BLOCK_SIZES}"
    if (selection.q_len, selection.kv_len) != (lq, lk):
        return f"selection built for q_len={selection.q_len}, kv_len={selection.kv_len}; got {lq}, {lk}"
    r = num_blocks(lq, selection.block_q)
    if tuple(selection.counts.shape) != (b, hq, r) or tuple(selection.indices.shape[:3]) != (b, hq, r):
        return f"selection shape {tuple(selection.indices.shape)} does not match [B={b}, Hq={hq}, R={r}, K]"
    return None


# ----------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------

if triton_available():
    import triton
    import triton.language as tl

    from attnpatch.backends.triton.combine import MAX_COMBINE as _MAX_COMBINE
    from attnpatch.backends.triton.combine import SUM_COMBINE as _SUM_COMBINE

    @triton.jit
    def _load_v(v_ptrs, k_ok, v_desc, b, hk, row0, MASKED: tl.constexpr, TMA: tl.constexpr,
                BLOCK_N: tl.constexpr, HEAD_DV: tl.constexpr):  # fmt: skip
        if TMA:  # the copy engine zero-fills rows past Lk
            v = v_desc.load([b, hk, row0, 0]).reshape(BLOCK_N, HEAD_DV)
        elif MASKED:
            v = tl.load(v_ptrs, mask=k_ok[:, None], other=0.0)
        else:
            v = tl.load(v_ptrs)
        return v

    @triton.jit
    def _online_update(
        acc, l_i, m_i, s, m_tile, v, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr
    ):
        # s, m_*: base-2 scaled scores. Masked tiles may hold rows with no visible key so far.
        m_new = tl.maximum(m_i, m_tile)
        if MASKED:
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_ref = m_new
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.reduce(p, 1, _SUM_COMBINE)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        return acc, l_i, m_new

    @triton.jit
    def _visit_tile(
        acc, l_i, m_i, n_skip, q, k_base, v_base, kb, stride_kn, stride_vn,
        q_pos, row_ok, kv_len, k_lo, qk_scale, thr, k_desc, v_desc, b32, hk32,
        BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
        MASKED: tl.constexpr, SKIP: tl.constexpr, DOT_PRECISION: tl.constexpr, PRESCALED: tl.constexpr,
        TMA: tl.constexpr,
    ):  # fmt: skip
        offs_n = tl.arange(0, BLOCK_N)
        k_pos = kb * BLOCK_N + offs_n
        k_rows = k_pos.to(tl.int64)
        k_ptrs = k_base + k_rows[:, None] * stride_kn + tl.arange(0, HEAD_D)[None, :]
        v_ptrs = v_base + k_rows[:, None] * stride_vn + tl.arange(0, HEAD_DV)[None, :]
        k_ok = k_pos < kv_len
        if TMA:  # Hopper's copy engine: the address is a coordinate, rows past Lk come back as 0
            k = k_desc.load([b32, hk32, kb * BLOCK_N, 0]).reshape(BLOCK_N, HEAD_D)
        elif MASKED:
            k = tl.load(k_ptrs, mask=k_ok[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
        if PRESCALED:  # q already carries σ·log2(e)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        else:
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            visible = (k_pos[None, :] <= q_pos[:, None]) & k_ok[None, :] & (k_pos[None, :] >= k_lo)
            s = tl.where(visible, s, float("-inf"))
        m_tile = tl.reduce(s, 1, _MAX_COMBINE)
        if SKIP:
            # A row vetoes the skip when its tile max is within ln(λ) of its running max (or it
            # has no running max yet). Rows past Lq and rows with no visible key do not vote.
            # V is loaded only for kept tiles: loading it before the vote (so it could pipeline) was
            # slower at 0 % and 79 % skipped, pointer and TMA loops (bench/results/skip_placement.json).
            veto = (m_tile - m_i >= thr) & (m_tile > float("-inf")) & row_ok
            n_veto = tl.reduce(veto.to(tl.int32), 0, _SUM_COMBINE)
            n_skip += (n_veto == 0).to(tl.int32)
            if n_veto > 0:
                v = _load_v(v_ptrs, k_ok, v_desc, b32, hk32, kb * BLOCK_N, MASKED, TMA, BLOCK_N, HEAD_DV)
                acc, l_i, m_i = _online_update(acc, l_i, m_i, s, m_tile, v, MASKED, DOT_PRECISION)
        else:
            v = _load_v(v_ptrs, k_ok, v_desc, b32, hk32, kb * BLOCK_N, MASKED, TMA, BLOCK_N, HEAD_DV)
            acc, l_i, m_i = _online_update(acc, l_i, m_i, s, m_tile, v, MASKED, DOT_PRECISION)
        return acc, l_i, m_i, n_skip

    @triton.jit
    def _block_sparse_fwd_kernel(
        Q, K, V, Out, Lse, M_in, L_in, Acc_in, M_out, L_out, Acc_out,
        Idx, Cnt, NFull, Thr, Tiles, KeyStart, KDesc, VDesc,
        stride_ib, stride_ih, stride_ir, stride_qb, stride_qh, stride_qm,
        stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn,
        stride_ob, stride_oh, stride_om,
        n_q_heads, group, q_len, kv_len, n_qblocks, qk_scale,
        HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_INIT: tl.constexpr, RETURN_STATE: tl.constexpr, WRITE_LSE: tl.constexpr,
        SKIP: tl.constexpr, COUNT: tl.constexpr, DOT_PRECISION: tl.constexpr,
        SUB_M: tl.constexpr, SUB_N: tl.constexpr, PRESCALE_Q: tl.constexpr, VARIANT: tl.constexpr,
        HAS_KEY_START: tl.constexpr, FULL_IN_KERNEL: tl.constexpr,
    ):  # fmt: skip
        # A program covers SUB_M rows of a BLOCK_M query block (its selection row is shared) and
        # walks each selected BLOCK_N key block in SUB_N-key steps: smaller tiles, same selection.
        pid_bh = tl.program_id(0)
        n_msub: tl.constexpr = BLOCK_M // SUB_M
        n_nsub: tl.constexpr = BLOCK_N // SUB_N
        pid_m = n_qblocks * n_msub - 1 - tl.program_id(1)  # late query rows see the most keys: start first
        r = pid_m // n_msub
        b = (pid_bh // n_q_heads).to(tl.int64)
        h = pid_bh % n_q_heads
        hk = (h // group).to(tl.int64)
        b32 = b.to(tl.int32)  # TMA coordinates are 32-bit
        hk32 = hk.to(tl.int32)

        offs_m = pid_m * SUB_M + tl.arange(0, SUB_M)
        row_ok = offs_m < q_len
        q_pos = offs_m + (kv_len - q_len)
        offs_d = tl.arange(0, HEAD_D)
        offs_dv = tl.arange(0, HEAD_DV)

        q_ptrs = Q + b * stride_qb + h.to(tl.int64) * stride_qh + offs_m.to(tl.int64)[:, None] * stride_qm
        q = tl.load(q_ptrs + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        if PRESCALE_Q:  # fold σ·log2(e) into Q once instead of scaling every score tile
            q = (q.to(tl.float32) * qk_scale).to(q.dtype)
        k_base = K + b * stride_kb + hk * stride_kh
        v_base = V + b * stride_vb + hk * stride_vh

        if HAS_KEY_START:  # left padding: keys before the row's first real token are masked
            k_lo = tl.load(KeyStart + b)
        else:
            k_lo = 0
        lut = pid_bh.to(tl.int64) * n_qblocks + r
        n_sel = tl.load(Cnt + lut)
        # the index list may be a stride-0 view (e.g. `BlockSelection.causal`): never materialised
        idx_row = Idx + b * stride_ib + h.to(tl.int64) * stride_ih + r.to(tl.int64) * stride_ir
        if FULL_IN_KERNEL:
            # Ascending list: the blocks that need a mask (straddling the diagonal or past Lk) are
            # its last entries; walk back over them (at most BLOCK_M / BLOCK_N + 1 steps).
            first_q = r * BLOCK_M + (kv_len - q_len)
            lim = tl.minimum(first_q + 1, kv_len) // BLOCK_N  # key blocks below lim need no mask
            n_full = n_sel
            last = tl.load(idx_row + n_full - 1, mask=n_full > 0, other=-1)
            while (n_full > 0) & (last >= lim):
                n_full -= 1
                last = tl.load(idx_row + n_full - 1, mask=n_full > 0, other=-1)
        else:
            n_full = tl.load(NFull + lut)

        state_rows = pid_bh.to(tl.int64) * q_len + offs_m
        if HAS_INIT:
            m_i = tl.load(M_in + state_rows, mask=row_ok, other=float("-inf")) * 1.4426950408889634
            l_i = tl.load(L_in + state_rows, mask=row_ok, other=0.0)
            acc = tl.load(
                Acc_in + state_rows[:, None] * HEAD_DV + offs_dv[None, :], mask=row_ok[:, None], other=0.0
            )
        else:
            m_i = tl.full([SUB_M], float("-inf"), tl.float32)
            l_i = tl.full([SUB_M], 0.0, tl.float32)
            acc = tl.full([SUB_M, HEAD_DV], 0.0, tl.float32)
        if SKIP:
            thr = tl.load(Thr + h)
        else:
            thr = 0.0
        n_skip = tl.full([], 0, tl.int32)

        # Key blocks entirely below the diagonal and inside Lk: no masks. VARIANT 1 loads the next
        # block index one iteration ahead, so the K/V address does not wait on a load (measured).
        kb_next = tl.load(idx_row, mask=n_full > 0, other=0)
        for j in range(0, n_full):
            if VARIANT >= 1:
                kb = kb_next
                kb_next = tl.load(idx_row + j + 1, mask=j + 1 < n_sel, other=0)
            else:
                kb = tl.load(idx_row + j)
            for sub in tl.static_range(n_nsub):
                acc, l_i, m_i, n_skip = _visit_tile(
                    acc, l_i, m_i, n_skip, q, k_base, v_base, kb * n_nsub + sub, stride_kn, stride_vn,
                    q_pos, row_ok, kv_len, k_lo, qk_scale, thr, KDesc, VDesc, b32, hk32,
                    SUB_N, HEAD_D, HEAD_DV, False, SKIP, DOT_PRECISION, PRESCALE_Q, VARIANT == 2,
                )  # fmt: skip
        # Blocks straddling the diagonal or running past Lk (ascending lists put them last).
        for j in range(n_full, n_sel):
            kb = tl.load(idx_row + j)
            for sub in tl.static_range(n_nsub):
                acc, l_i, m_i, n_skip = _visit_tile(
                    acc, l_i, m_i, n_skip, q, k_base, v_base, kb * n_nsub + sub, stride_kn, stride_vn,
                    q_pos, row_ok, kv_len, k_lo, qk_scale, thr, KDesc, VDesc, b32, hk32,
                    SUB_N, HEAD_D, HEAD_DV, True, SKIP, DOT_PRECISION, PRESCALE_Q, VARIANT == 2,
                )  # fmt: skip

        if RETURN_STATE:
            tl.store(M_out + state_rows, m_i * 0.6931471805599453, mask=row_ok)
            tl.store(L_out + state_rows, l_i, mask=row_ok)
            tl.store(Acc_out + state_rows[:, None] * HEAD_DV + offs_dv[None, :], acc, mask=row_ok[:, None])
        else:
            l_div = tl.where(l_i > 0.0, l_i, 1.0)
            out = acc / l_div[:, None]
            o_ptrs = Out + b * stride_ob + h.to(tl.int64) * stride_oh + offs_m.to(tl.int64)[:, None] * stride_om
            tl.store(o_ptrs + offs_dv[None, :], out.to(Out.dtype.element_ty), mask=row_ok[:, None])
        if WRITE_LSE:
            l_log = tl.where(l_i > 0.0, l_i, 1.0)
            lse = tl.where(l_i > 0.0, m_i * 0.6931471805599453 + tl.log(l_log), float("-inf"))
            tl.store(Lse + state_rows, lse, mask=row_ok)
        if COUNT:
            tl.store(Tiles + lut * 2, n_sel)
            tl.store(Tiles + lut * 2 + 1, n_skip)

    _KERNEL_INTERPRETED = is_interpreted(_block_sparse_fwd_kernel)
else:
    _KERNEL_INTERPRETED = False


def _tensor_descriptor(t: torch.Tensor, rows: int):
    """A TMA descriptor over a `[B, H, L, D]` tensor with `[1, 1, rows, D]` boxes, or None where the
    copy engine cannot address it (16-byte aligned base and strides, unit last stride, no
    stride-0 broadcast dimension)."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        return None
    size = t.element_size()
    if t.stride(-1) != 1 or t.data_ptr() % 16 or any((s * size) % 16 for s in t.stride()[:-1]):
        return None
    if any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape, strict=True)):  # broadcast views
        return None
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, t.shape[-1]])


@on_input_device
def block_sparse_attention_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    selection: BlockSelection,
    scale: float | None = None,
    return_lse: bool = False,
    skip_bound: float | torch.Tensor | None = None,
    init_state: Sequence[torch.Tensor] | None = None,
    return_state: bool = False,
    count_tiles: bool = False,
    *,
    num_warps: int | None = None,
    num_stages: int | None = None,
    sub_m: int | None = None,
    sub_n: int | None = None,
    prescale_q: bool | None = None,
    variant: int | None = None,
    key_start: torch.Tensor | None = None,
    full_in_kernel: bool | None = None,
):
    """Block-sparse causal attention forward over `selection`, in Triton.

    query `[B, Hq, Lq, D]`, key/value `[B, Hkv, Lk, D]` (any B/H/L strides; GQA with `Hq` a
    multiple of `Hkv`); D ∈ `ALLOWED_HEAD_DIMS`; blocks ∈ `ALLOWED_BLOCK_SIZES`; fp16, bf16 or
    fp32 (CUDA, or CPU under `TRITON_INTERPRET=1`). Unsupported inputs raise ValueError (see
    `unsupported_reason`), so callers can fall back to `reference.block_sparse_attention`.

    * ``scale``: softmax scale σ (default ``1/sqrt(D)``).
    * ``skip_bound``: ln λ on scaled scores (float, or tensor of 1 or ``Hq`` per-head values) enables
      BLASST tile skipping (see the module docstring).
    * ``key_start``: int ``[B]``, left padding — keys before ``key_start[b]`` are masked.
    * ``full_in_kernel``: find each list's mask-free prefix inside the kernel (a short walk back
      from its end; relies on ascending lists) instead of with ~15 small host-launched torch ops;
      not with ``key_start``. Default `_FULL_IN_KERNEL`.
    * ``init_state=(m, l, acc)``: resume from a previous partial pass (see module docstring for
      the domain: ``m`` on natural-log scaled scores; float32 ``[B,Hq,Lq]``, ``[B,Hq,Lq]``,
      ``[B,Hq,Lq,Dv]``).

    Returns ``out`` ``[B, Hq, Lq, Dv]`` in the input dtype — or, with ``return_state``, the
    un-normalised ``(m, l, acc)`` in its place — followed, when requested, by the natural-log
    ``lse`` ``[B, Hq, Lq]`` float32 (``return_lse``) and ``(visited_tiles, skipped_tiles)`` as 0-dim
    int64 tensors (``count_tiles``). With no extra requested the bare primary result is returned.
    Rows that see no key give 0 output and ``lse = -inf``.
    """
    reason = unsupported_reason(query, key, value, selection)
    if reason is not None:
        raise ValueError(f"block_sparse_attention_triton: {reason}")
    b, hq, lq, d = query.shape
    hkv, lk, dv = key.shape[1], key.shape[2], value.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    bq, bk = selection.block_q, selection.block_k
    n_qb = num_blocks(lq, bq)
    device = query.device
    state_in = None if init_state is None else check_state(init_state, b, hq, lq, dv)
    thr = None
    if skip_bound is not None:
        thr = bound_per_head(skip_bound, hq, device, base2=True)

    out = None if return_state else torch.empty(b, hq, lq, dv, dtype=query.dtype, device=device)
    lse = torch.empty(b, hq, lq, dtype=torch.float32, device=device) if return_lse else None
    state_out = None
    if return_state:
        state_out = (
            torch.empty(b, hq, lq, dtype=torch.float32, device=device),
            torch.empty(b, hq, lq, dtype=torch.float32, device=device),
            torch.empty(b, hq, lq, dv, dtype=torch.float32, device=device),
        )
    tiles = torch.zeros(b, hq, n_qb, 2, dtype=torch.int32, device=device) if count_tiles else None

    if b * hq * n_qb > 0:
        query = with_contiguous_last_dim(query)
        key = with_contiguous_last_dim(key)
        value = with_contiguous_last_dim(value)
        indices = selection.indices.to(device=device, dtype=torch.int32)
        if indices.shape[-1] > 1 and indices.stride(-1) != 1:
            indices = indices.contiguous()
        counts = selection.counts.to(device=device, dtype=torch.int32).contiguous()
        if key_start is not None:
            key_start = key_start.to(device=device, dtype=torch.int32).contiguous()
            if tuple(key_start.shape) != (b,):
                raise ValueError(f"key_start must be [B={b}], got {tuple(key_start.shape)}")
        in_kernel = (_FULL_IN_KERNEL if full_in_kernel is None else full_in_kernel) and key_start is None
        n_full = counts if in_kernel else mask_free_prefix(indices, counts, bq, bk, lq, lk,
                                                           KeyBounds(key_start=key_start))
        if state_in is not None:
            state_in = tuple(t.to(device=device, dtype=torch.float32).contiguous() for t in state_in)
        variant = default_variant(device, d, query.dtype) if variant is None else variant
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS} (0: index loaded in place, 1: prefetched one "
                             f"ahead, 2: 1 + TMA loads), got {variant!r}")
        warps, stages = launch_config(d, bq, bk, query.dtype)
        sm, sn = sub_tiles(d, bq, bk)
        if variant == 2 and query.dtype != torch.float32:
            warps, stages = _TMA_LAUNCH_CONFIGS.get(d, (warps, stages))
            sm, sn = _TMA_SUB_TILES.get(d, {}).get((bq, bk), (bq, bk))
        warps = num_warps or warps
        stages = num_stages or stages
        sm, sn = sub_m or sm, sub_n or sn
        if thr is not None or count_tiles or query.dtype == torch.float32:
            sm, sn = bq, bk  # BLASST's tile is the selection block; counters are per block
        if bq % sm or bk % sn or sm < 16 or sn < 16:
            raise ValueError(f"sub-tiles {sm}×{sn} must divide the blocks {bq}×{bk} and be >= 16")
        k_desc = v_desc = None
        if variant == 2:
            k_desc, v_desc = _tensor_descriptor(key, sn), _tensor_descriptor(value, sn)
            if k_desc is None or v_desc is None:
                variant, k_desc, v_desc = 1, None, None
        dummy = torch.empty(1, dtype=torch.float32, device=device)
        o = out if out is not None else torch.empty(1, 1, 1, 1, dtype=query.dtype, device=device)
        m_in, l_in, a_in = state_in if state_in is not None else (dummy, dummy, dummy)
        m_out, l_out, a_out = state_out if state_out is not None else (dummy, dummy, dummy)
        _block_sparse_fwd_kernel[(b * hq, n_qb * (bq // sm))](
            query, key, value, o, lse if lse is not None else dummy,
            m_in, l_in, a_in, m_out, l_out, a_out,
            indices, counts, n_full, thr if thr is not None else dummy,
            tiles if tiles is not None else counts, key_start if key_start is not None else counts,
            k_desc, v_desc, indices.stride(0), indices.stride(1), indices.stride(2),
            query.stride(0), query.stride(1), query.stride(2),
            key.stride(0), key.stride(1), key.stride(2),
            value.stride(0), value.stride(1), value.stride(2),
            o.stride(0), o.stride(1), o.stride(2),
            hq, hq // hkv, lq, lk, n_qb, scale * _LOG2E,
            HEAD_D=d, HEAD_DV=dv, BLOCK_M=bq, BLOCK_N=bk,
            HAS_INIT=state_in is not None, RETURN_STATE=return_state, WRITE_LSE=return_lse,
            SKIP=thr is not None, COUNT=count_tiles,
            DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
            SUB_M=sm, SUB_N=sn, PRESCALE_Q=_PRESCALE_Q if prescale_q is None else prescale_q,
            VARIANT=variant, HAS_KEY_START=key_start is not None,
            FULL_IN_KERNEL=in_kernel,
            num_warps=warps, num_stages=stages,
        )  # fmt: skip

    tile_counts = None
    if tiles is not None:
        totals = tiles.sum(dim=(0, 1, 2), dtype=torch.int64)
        tile_counts = (totals[0], totals[1])
    primary = state_out if return_state else out
    return pack_results(primary, lse, tile_counts)
