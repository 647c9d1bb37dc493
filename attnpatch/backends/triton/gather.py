# ruff: noqa: SIM108  (constexpr if/else blocks in @triton.jit code are kept explicit)
"""Token-gather prefill attention in Triton: executes a given `TokenSelection`.

For stripe / permutation sparse methods (AnchorAttention, S2O style) whose selections are lists of
key *positions* rather than key blocks. One program per (batch · query head, query block of
``block_q`` rows): it walks the ascending position list of its query block in chunks of ``chunk``
entries, loads the int32 positions, gathers the K rows and V rows through them (pointer vectors,
no copy of K/V is ever made), and runs an exp2 online softmax with fp32 accumulation. Queries are
aligned to the end of the keys (query ``i`` sits at position ``Lk − Lq + i``, chunked prefill) and
the causal rule is applied per token. GQA is native: the program of query head ``h`` reads the
K/V of KV head ``h // (Hq / Hkv)`` in place.

The leading run of each list whose positions are visible to *every* row of the query block (at or
before the block's first query position) is processed without any mask; only the remaining chunks
(the part of the list that reaches the diagonal, and the ragged tail) are masked.

Resumable state ``(m, l, acc)``, per query row, float32 — the same convention as
`attnpatch.backends.triton.block_sparse`, so a block-sparse pass and a gather pass over disjoint
key sets can be chained:

* ``m``   ``[B, Hq, Lq]`` running maximum of the *natural-log scaled scores* ``scale · q·k``
  seen so far (``-inf`` for a row that has seen no key yet);
* ``l``   ``[B, Hq, Lq]`` running ``Σ exp(scale · q·k − m)``;
* ``acc`` ``[B, Hq, Lq, Dv]`` un-normalised ``Σ exp(scale · q·k − m) · v``.

Hence ``lse = m + log(l)`` and ``out = acc / l`` (0 where ``l = 0``). A normalised partial result
``(out, lse)`` is also a valid state: ``(lse, 1, out)`` (``(−inf, 0, 0)`` for rows that saw
nothing), see `state_from_output`. Internally the kernel works in base 2 (``m₂ = m · log2 e``)
and converts when loading and storing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from attnpatch.backends.inputs import KERNEL_HEAD_DIMS, qkv_reason
from attnpatch.backends.partial_state import check_state, finalize_state, state_from_output
from attnpatch.backends.triton.utils import (
    fp32_tiles_reason,
    is_interpreted,
    on_input_device,
    tensor_device_ok,
    triton_available,
    with_contiguous_last_dim,
)
from attnpatch.sparsity import TokenSelection, num_blocks
from attnpatch.sparsity.split import mask_free_prefix

__all__ = [
    "ALLOWED_BLOCK_Q",
    "ALLOWED_CHUNKS",
    "ALLOWED_HEAD_DIMS",
    "finalize_state",
    "launch_config",
    "state_from_output",
    "token_gather_attention_triton",
    "unsupported_reason",
]

ALLOWED_HEAD_DIMS = KERNEL_HEAD_DIMS
ALLOWED_BLOCK_Q = (16, 32, 64, 128)  # 64 and 128 in production; 16/32 for small tests
ALLOWED_CHUNKS = (16, 32, 64, 128)  # 64 and 128 in production; 16/32 for small tests
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634

# (num_warps, num_stages) keyed by head_dim, then (block_q, chunk). Shared memory per CTA ≈ Q tile
# + stages × (K rows + V rows of one chunk). Not tuned yet: to be measured on the GPU.
_LAUNCH_CONFIGS: dict[int, dict[tuple[int, int], tuple[int, int]]] = {
    128: {(64, 64): (4, 3), (64, 128): (8, 2), (128, 64): (8, 3), (128, 128): (8, 2)},
    64: {(64, 64): (4, 3), (64, 128): (4, 3), (128, 64): (4, 3), (128, 128): (8, 3)},
    256: {(64, 64): (4, 2), (64, 128): (8, 1), (128, 64): (8, 1), (128, 128): (8, 1)},
}


def launch_config(
    head_dim: int, block_q: int, chunk: int, dtype: torch.dtype = torch.float16
) -> tuple[int, int]:
    """`(num_warps, num_stages)` for a head dim, query block, chunk and input dtype (no autotuning)."""
    warps, stages = _LAUNCH_CONFIGS.get(head_dim, {}).get((block_q, chunk), (4, 2))
    if dtype == torch.float32:  # fp32 tiles are twice as large: no software pipelining
        stages = 1
    return warps, stages


def unsupported_reason(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    selection: TokenSelection,
    chunk: int = 64,
) -> str | None:
    """Why the Triton kernel cannot run these inputs (None when it can): the caller falls back."""
    if not triton_available():
        return "triton is not installed"
    reason = qkv_reason(query, key, value, selection, ALLOWED_HEAD_DIMS, _DTYPES, "allowed head dims")
    if reason is not None:
        return reason
    b, hq, lq, d = query.shape
    lk = key.shape[2]
    if not tensor_device_ok(query, _KERNEL_INTERPRETED):
        return f"device {query.device} (need CUDA, or CPU with TRITON_INTERPRET=1 set before import)"
    if (why := fp32_tiles_reason(query)) is not None:
        return why
    if selection.block_q not in ALLOWED_BLOCK_Q:
        return f"block_q {selection.block_q} not supported; allowed: {ALLOWED_BLOCK_Q}"
    if chunk not in ALLOWED_CHUNKS:
        return f"chunk {chunk} not supported; allowed: {ALLOWED_CHUNKS}"
    if (selection.q_len, selection.kv_len) != (lq, lk):
        return f"selection built for q_len={selection.q_len}, kv_len={selection.kv_len}; got {lq}, {lk}"
    r = num_blocks(lq, selection.block_q)
    if selection.indices.dim() != 4 or tuple(selection.indices.shape[:3]) != (b, hq, r):
        return f"selection indices {tuple(selection.indices.shape)} do not match [B={b}, Hq={hq}, R={r}, K]"
    if tuple(selection.counts.shape) != (b, hq, r):
        return f"selection counts {tuple(selection.counts.shape)} do not match [B={b}, Hq={hq}, R={r}]"
    if selection.indices.dtype not in (torch.int32, torch.int64) or selection.counts.dtype not in (
        torch.int32,
        torch.int64,
    ):
        return ("selection indices/counts must be int32 (or int64), "
                f"got {selection.indices.dtype}/{selection.counts.dtype}")
    return None


# ----------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------

if triton_available():
    import triton
    import triton.language as tl

    # Row reductions go through `tl.reduce` with the shared combine functions (see combine.py: they
    # also run under the interpreter when triton was imported before TRITON_INTERPRET was set).
    from attnpatch.backends.triton.combine import MAX_COMBINE as _MAX
    from attnpatch.backends.triton.combine import SUM_COMBINE as _SUM

    @triton.jit
    def _gather_chunk(
        acc, l_i, m_i, q, k_base, v_base, idx_row, start, n_sel, stride_ik, stride_kn, stride_vn,
        q_pos, kv_len, qk_scale,
        CHUNK: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
        MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):  # fmt: skip
        # One chunk of the position list: gather K/V rows, scores in base 2, online softmax update.
        offs = start + tl.arange(0, CHUNK)
        idx_ptrs = idx_row + offs.to(tl.int64) * stride_ik
        if MASKED:
            in_list = offs < n_sel
            pos = tl.load(idx_ptrs, mask=in_list, other=0)
            ok = in_list & (pos >= 0) & (pos < kv_len)  # out-of-range positions are ignored
            rows = tl.where(ok, pos, 0).to(tl.int64)
        else:
            pos = tl.load(idx_ptrs)
            rows = pos.to(tl.int64)
        k_ptrs = k_base + rows[:, None] * stride_kn + tl.arange(0, HEAD_D)[None, :]
        v_ptrs = v_base + rows[:, None] * stride_vn + tl.arange(0, HEAD_DV)[None, :]
        if MASKED:
            k = tl.load(k_ptrs, mask=ok[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            visible = ok[None, :] & (pos[None, :] <= q_pos[:, None])
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(s, 1, _MAX))
        if MASKED:  # a row may have seen no key at all yet: keep exp2 away from (-inf) - (-inf)
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_ref = m_new
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.reduce(p, 1, _SUM)
        if MASKED:
            v = tl.load(v_ptrs, mask=ok[:, None], other=0.0)
        else:
            v = tl.load(v_ptrs)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        return acc, l_i, m_new

    @triton.jit
    def _token_gather_fwd_kernel(
        Q, K, V, Out, Lse, M_in, L_in, Acc_in, M_out, L_out, Acc_out, Idx, Cnt, NFull,
        stride_qb, stride_qh, stride_qm,
        stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn,
        stride_ob, stride_oh, stride_om,
        stride_ib, stride_ih, stride_ir, stride_ik,
        stride_cb, stride_ch, stride_cr,
        n_q_heads, group, q_len, kv_len, n_qblocks, qk_scale,
        HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr,
        HAS_INIT: tl.constexpr, RETURN_STATE: tl.constexpr, WRITE_LSE: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):  # fmt: skip
        pid_bh = tl.program_id(0)
        r = n_qblocks - 1 - tl.program_id(1)  # late query blocks usually see the most keys: start them first
        b = (pid_bh // n_q_heads).to(tl.int64)
        h = (pid_bh % n_q_heads).to(tl.int64)
        hk = h // group

        offs_m = r * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = offs_m < q_len
        q_pos = offs_m + (kv_len - q_len)
        offs_d = tl.arange(0, HEAD_D)
        offs_dv = tl.arange(0, HEAD_DV)

        q_ptrs = (
            Q + b * stride_qb + h * stride_qh + offs_m.to(tl.int64)[:, None] * stride_qm + offs_d[None, :]
        )
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
        k_base = K + b * stride_kb + hk * stride_kh
        v_base = V + b * stride_vb + hk * stride_vh

        r64 = r.to(tl.int64)
        n_sel = tl.load(Cnt + b * stride_cb + h * stride_ch + r64 * stride_cr)
        n_full = tl.load(NFull + pid_bh.to(tl.int64) * n_qblocks + r64)
        idx_row = Idx + b * stride_ib + h * stride_ih + r64 * stride_ir

        state_rows = pid_bh.to(tl.int64) * q_len + offs_m
        if HAS_INIT:
            m_i = tl.load(M_in + state_rows, mask=row_ok, other=float("-inf")) * 1.4426950408889634
            l_i = tl.load(L_in + state_rows, mask=row_ok, other=0.0)
            acc = tl.load(
                Acc_in + state_rows[:, None] * HEAD_DV + offs_dv[None, :], mask=row_ok[:, None], other=0.0
            )
        else:
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            # tl.full, not tl.zeros: a builtin (see combine.py)
            l_i = tl.full([BLOCK_M], 0.0, tl.float32)
            acc = tl.full([BLOCK_M, HEAD_DV], 0.0, tl.float32)

        # Whole chunks of the leading run visible to every row of the block: no masks at all.
        full_end = (n_full // CHUNK) * CHUNK
        for start in range(0, full_end, CHUNK):
            acc, l_i, m_i = _gather_chunk(
                acc, l_i, m_i, q, k_base, v_base, idx_row, start, n_sel, stride_ik, stride_kn, stride_vn,
                q_pos, kv_len, qk_scale, CHUNK, HEAD_D, HEAD_DV, False, DOT_PRECISION,
            )  # fmt: skip
        # The rest: chunks reaching the causal diagonal and the ragged tail of the list.
        for start in range(full_end, n_sel, CHUNK):
            acc, l_i, m_i = _gather_chunk(
                acc, l_i, m_i, q, k_base, v_base, idx_row, start, n_sel, stride_ik, stride_kn, stride_vn,
                q_pos, kv_len, qk_scale, CHUNK, HEAD_D, HEAD_DV, True, DOT_PRECISION,
            )  # fmt: skip

        if RETURN_STATE:
            tl.store(M_out + state_rows, m_i * 0.6931471805599453, mask=row_ok)
            tl.store(L_out + state_rows, l_i, mask=row_ok)
            tl.store(Acc_out + state_rows[:, None] * HEAD_DV + offs_dv[None, :], acc, mask=row_ok[:, None])
        else:
            l_div = tl.where(l_i > 0.0, l_i, 1.0)
            out = acc / l_div[:, None]
            o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m.to(tl.int64)[:, None] * stride_om
            tl.store(o_ptrs + offs_dv[None, :], out.to(Out.dtype.element_ty), mask=row_ok[:, None])
        if WRITE_LSE:
            l_log = tl.where(l_i > 0.0, l_i, 1.0)
            lse = tl.where(l_i > 0.0, m_i * 0.6931471805599453 + tl.log(l_log), float("-inf"))
            tl.store(Lse + state_rows, lse, mask=row_ok)

    _KERNEL_INTERPRETED = is_interpreted(_token_gather_fwd_kernel)
else:
    _KERNEL_INTERPRETED = False


@on_input_device
def token_gather_attention_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    selection: TokenSelection,
    scale: float | None = None,
    return_lse: bool = False,
    chunk: int = 64,
    init_state: Sequence[torch.Tensor] | None = None,
    return_state: bool = False,
    *,
    num_warps: int | None = None,
    num_stages: int | None = None,
):
    """Causal attention of each query block over its selected key positions, in Triton.

    query ``[B, Hq, Lq, D]``, key/value ``[B, Hkv, Lk, D]`` (last dim contiguous, any other strides;
    GQA with ``Hq`` a multiple of ``Hkv``, K/V never repeated); D ∈ `ALLOWED_HEAD_DIMS`;
    ``selection.block_q`` ∈ `ALLOWED_BLOCK_Q`; ``chunk`` (list entries per inner step) ∈
    `ALLOWED_CHUNKS`; fp16, bf16 or fp32 (CUDA, or CPU under ``TRITON_INTERPRET=1``). Unsupported
    inputs raise ValueError (see `unsupported_reason`) so callers can fall back to
    `reference.token_gather_attention`, whose semantics this matches: positions are
    ``selection.indices[b, h, r, :counts[b, h, r]]`` (ascending; a shared selection expanded with
    stride 0 over heads is read in place), a key at position ``p`` is seen by query ``i`` iff
    ``p ≤ Lk − Lq + i``. Positions outside ``[0, Lk)`` are ignored; counts are clamped to ``[0, K]``.

    * ``scale``: softmax scale σ (default ``1/sqrt(D)``).
    * ``init_state=(m, l, acc)``: resume from a previous partial pass over a *disjoint* key set
      (float32 ``[B,Hq,Lq]``, ``[B,Hq,Lq]``, ``[B,Hq,Lq,Dv]``; ``m`` on natural-log scaled scores
      σ·q·k — see the module docstring and `state_from_output`).
    * ``return_state``: return the un-normalised ``(m, l, acc)`` instead of the output.

    Returns ``out`` ``[B, Hq, Lq, Dv]`` in the input dtype — or, with ``return_state``, the tuple
    ``(m, l, acc)`` in its place — followed by the natural-log ``lse`` ``[B, Hq, Lq]`` float32 when
    ``return_lse``. Rows that see no key give output 0 and ``lse = -inf``.
    """
    reason = unsupported_reason(query, key, value, selection, chunk)
    if reason is not None:
        raise ValueError(f"token_gather_attention_triton: {reason}")
    b, hq, lq, d = query.shape
    hkv, lk, dv = key.shape[1], key.shape[2], value.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    bq = selection.block_q
    n_qb = num_blocks(lq, bq)
    device = query.device
    state_in = None if init_state is None else check_state(init_state, b, hq, lq, dv)

    out = None if return_state else torch.empty(b, hq, lq, dv, dtype=query.dtype, device=device)
    lse = torch.empty(b, hq, lq, dtype=torch.float32, device=device) if return_lse else None
    state_out = None
    if return_state:
        state_out = (
            torch.empty(b, hq, lq, dtype=torch.float32, device=device),
            torch.empty(b, hq, lq, dtype=torch.float32, device=device),
            torch.empty(b, hq, lq, dv, dtype=torch.float32, device=device),
        )

    if b * hq * n_qb > 0:
        query = with_contiguous_last_dim(query)
        key = with_contiguous_last_dim(key)
        value = with_contiguous_last_dim(value)
        indices = (
            selection.indices if selection.indices.dtype == torch.int32 else selection.indices.to(torch.int32)
        )
        kmax = indices.shape[-1]
        counts = selection.counts.to(torch.int32).clamp(0, kmax)  # no host sync; always a fresh tensor
        n_full = mask_free_prefix(indices, counts, bq, 1, lq, lk)
        if state_in is not None:
            state_in = tuple(t.to(device=device, dtype=torch.float32).contiguous() for t in state_in)
        warps, stages = launch_config(d, bq, chunk, query.dtype)
        warps = num_warps or warps
        stages = num_stages or stages
        dummy = torch.empty(1, dtype=torch.float32, device=device)
        o = out if out is not None else torch.empty(1, 1, 1, 1, dtype=query.dtype, device=device)
        m_in, l_in, a_in = state_in if state_in is not None else (dummy, dummy, dummy)
        m_out, l_out, a_out = state_out if state_out is not None else (dummy, dummy, dummy)
        _token_gather_fwd_kernel[(b * hq, n_qb)](
            query, key, value, o, lse if lse is not None else dummy,
            m_in, l_in, a_in, m_out, l_out, a_out, indices, counts, n_full,
            query.stride(0), query.stride(1), query.stride(2),
            key.stride(0), key.stride(1), key.stride(2),
            value.stride(0), value.stride(1), value.stride(2),
            o.stride(0), o.stride(1), o.stride(2),
            indices.stride(0), indices.stride(1), indices.stride(2), indices.stride(3),
            counts.stride(0), counts.stride(1), counts.stride(2),
            hq, hq // hkv, lq, lk, n_qb, scale * _LOG2E,
            HEAD_D=d, HEAD_DV=dv, BLOCK_M=bq, CHUNK=chunk,
            HAS_INIT=state_in is not None, RETURN_STATE=return_state, WRITE_LSE=return_lse,
            DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
            num_warps=warps, num_stages=stages,
        )  # fmt: skip

    primary = state_out if return_state else out
    return (primary, lse) if return_lse else primary
