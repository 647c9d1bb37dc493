"""CuTe DSL `mask_mod`s for the flash-attn-4 backend (imported lazily: needs `cutlass` and `flash_attn`).

fa4 calls a mask_mod on the partial ("mask") blocks of a block-sparse call as
`mask_mod(batch, head, q_idx, kv_idx, seqlen_info, aux_tensors)` with one-element int32 SSA values;
`q_idx` counts queries from 0, `kv_idx` keys from 0, so the query's absolute position is
`q_idx + seqlen_k - seqlen_q` (chunked prefill). True keeps the score. `aux_tensors[0]`, when given,
is the int32 `[B]` first real key per row (left padding). The window is a compile-time constant
captured by closure (fa4 keys its compile cache on the closure's values).
"""

from __future__ import annotations

import functools

import cutlass
import cutlass.cute as cute
from flash_attn.cute import utils


@cute.jit
def causal_mask(batch, head, q_idx, kv_idx, seqlen_info, aux_tensors):
    pos = q_idx + utils.scalar_to_ssa(seqlen_info.seqlen_k - seqlen_info.seqlen_q, cutlass.Int32)
    return kv_idx <= pos


@cute.jit
def causal_padded_mask(batch, head, q_idx, kv_idx, seqlen_info, aux_tensors):
    pos = q_idx + utils.scalar_to_ssa(seqlen_info.seqlen_k - seqlen_info.seqlen_q, cutlass.Int32)
    start = utils.scalar_to_ssa(aux_tensors[0][batch[0]], cutlass.Int32)
    return (kv_idx <= pos) & (kv_idx >= start)


@functools.cache
def causal_window_mask(window: int):
    @cute.jit
    def _causal_window_mask(batch, head, q_idx, kv_idx, seqlen_info, aux_tensors):
        pos = q_idx + utils.scalar_to_ssa(seqlen_info.seqlen_k - seqlen_info.seqlen_q, cutlass.Int32)
        return (kv_idx <= pos) & (pos - kv_idx < utils.scalar_to_ssa(window, cutlass.Int32))

    return _causal_window_mask


@functools.cache
def causal_window_padded_mask(window: int):
    @cute.jit
    def _causal_window_padded_mask(batch, head, q_idx, kv_idx, seqlen_info, aux_tensors):
        pos = q_idx + utils.scalar_to_ssa(seqlen_info.seqlen_k - seqlen_info.seqlen_q, cutlass.Int32)
        start = utils.scalar_to_ssa(aux_tensors[0][batch[0]], cutlass.Int32)
        inside = pos - kv_idx < utils.scalar_to_ssa(window, cutlass.Int32)
        return (kv_idx <= pos) & (kv_idx >= start) & inside

    return _causal_window_padded_mask


def mask_mod(window: int | None, padded: bool):
    """The mask_mod for (window, padding); the same function object for the same arguments."""
    if window is None:
        return causal_padded_mask if padded else causal_mask
    return causal_window_padded_mask(window) if padded else causal_window_mask(window)
