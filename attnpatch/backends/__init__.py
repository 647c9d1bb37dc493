"""Executors: compute attention over a selection. They know nothing of methods.

Backends: "reference" (exact PyTorch, any device), "triton" (GPU kernels), "flex" (FlexAttention
on the same block selection, prefill only), "auto" (triton on CUDA when it supports the inputs,
else reference). A backend that cannot take an input falls back to the reference and says why.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from attnpatch.backends.reference import block_sparse_attention, paged_decode_attention
from attnpatch.sparsity import BlockSelection, PageSelection

BACKENDS = ("auto", "reference", "triton", "flex")


def _skip_lambda(selection) -> float | torch.Tensor | None:
    """The kernels take λ (scaled convention); the selection carries ln λ."""
    if selection.skip is None:
        return None
    thr = selection.skip.log_threshold
    return thr.exp() if isinstance(thr, torch.Tensor) else math.exp(thr)


def _first_real_key(valid: torch.Tensor) -> torch.Tensor | None:
    """`[B]` first valid key per row when `valid` `[B, L]` is left padding, else None."""
    start = valid.to(torch.int8).argmax(dim=-1)
    left = torch.equal(valid, torch.arange(valid.shape[-1], device=valid.device) >= start.unsqueeze(-1))
    return start if left else None


# transformers builds one mask per forward and hands the same tensor to every layer: the check
# below (a pass over the mask plus a host sync) runs once per mask, not once per layer.
_LAST_MASK: list = [None, None]


def _left_padding(mask: torch.Tensor, q_len: int, kv_len: int) -> tuple[torch.Tensor | None, str | None]:
    """First real key per row when `mask` is causal AND left padding; else a reason to fall back."""
    if _LAST_MASK[0] is mask:
        return _LAST_MASK[1]
    from attnpatch.backends.flex import padding_key_validity

    try:
        valid = padding_key_validity(mask, q_len, kv_len)
        start = _first_real_key(valid)
        result = (start, None) if start is not None else (None, "padding is not left padding (the kernel takes a first key)")
    except ValueError as e:
        result = (None, f"mask is not causal + padding ({e})")
    _LAST_MASK[:] = [mask, result]
    return result


def _run_kernel(kernel, query, key, value, selection, scale, key_start, tile_counts):
    """Call a Triton kernel with the selection's skip rule (scaled λ) and add its tile counters."""
    lam = _skip_lambda(selection)
    kw = {} if lam is None else {"skip_threshold": lam, "skip_convention": "scaled"}
    out = kernel(query, key, value, selection, scale=scale, key_start=key_start,
                 count_tiles=tile_counts is not None, **kw)
    if tile_counts is not None:
        out, (visited, skipped) = out
        tile_counts += torch.stack([visited, skipped]).to(tile_counts)
    return out


def _triton_prefill(query, key, value, selection: BlockSelection, scale, mask, tile_counts):
    from attnpatch.backends.triton.block_sparse import block_sparse_attention_triton, unsupported_reason

    reason = unsupported_reason(query, key, value, selection)
    if reason is not None:
        return None, reason
    key_start = None
    if mask is not None:
        key_start, reason = _left_padding(mask, query.shape[2], key.shape[2])
        if reason is not None:
            return None, reason
    return _run_kernel(block_sparse_attention_triton, query, key, value, selection, scale, key_start, tile_counts), None


def _flex_prefill(query, key, value, selection: BlockSelection, scale, mask, tile_counts):
    from attnpatch.backends.flex import flex_block_sparse_attention

    if selection.skip is not None:
        return None, "FlexAttention has no skip-threshold mode"
    try:
        out = flex_block_sparse_attention(query, key, value, selection, scale=scale, mask=mask,
                                          compile=query.is_cuda)
    except ValueError as e:
        return None, str(e)
    if tile_counts is not None:
        tile_counts[0] += selection.counts.sum()
    return out, None


def _triton_decode(query, key, value, selection: PageSelection, scale, key_mask, tile_counts):
    from attnpatch.backends.triton.decode import sparse_decode_attention, unsupported_reason

    reason = unsupported_reason(query, key, value, selection)
    if reason is not None:
        return None, reason
    key_start = None
    if key_mask is not None:
        key_start = _first_real_key(key_mask)
        if key_start is None:
            return None, "key mask is not left padding (sliding window?): the decode kernel takes a first key"
    return _run_kernel(sparse_decode_attention, query, key, value, selection, scale, key_start, tile_counts), None


@dataclass(frozen=True)
class Executors:
    """The executor pair a patch uses. Each call returns `(output, fallback reason or None)`."""

    name: str

    def prefill(self, query, key, value, selection: BlockSelection, scale: float, mask=None, tile_counts=None):
        fast: Callable | None = None
        if self.name == "flex":
            fast = _flex_prefill
        elif self.name == "triton" or (self.name == "auto" and query.is_cuda):
            fast = _triton_prefill
        reason = None
        if fast is not None:
            out, reason = fast(query, key, value, selection, scale, mask, tile_counts)
            if out is not None:
                return out, None
        out = block_sparse_attention(query, key, value, selection, scale=scale, mask=mask, tile_counts=tile_counts)
        return out, reason

    def decode(self, query, key, value, selection: PageSelection, scale: float, key_mask=None, tile_counts=None):
        reason = None
        if self.name == "triton" or (self.name in ("auto", "flex") and query.is_cuda):
            out, reason = _triton_decode(query, key, value, selection, scale, key_mask, tile_counts)
            if out is not None:
                return out, None
        out = paged_decode_attention(query, key, value, selection, scale=scale, key_mask=key_mask,
                                     tile_counts=tile_counts)
        return out, reason


def get_executors(backend: str = "auto") -> Executors:
    """Resolve a backend name; ValueError names the allowed ones."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    return Executors(backend)
