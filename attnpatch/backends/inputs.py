"""What every executor checks on its inputs, written once: Q/K/V shapes, head dims, dtypes, devices,
and the zero padding of the sequence dimension the executors use for ragged last blocks."""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Head dims of the Triton kernels (block-sparse, token gather, split-KV decode and its PyTorch twin):
# 64, 128 and 256 (Gemma 2/3) in production; 16/32 for small tests.
KERNEL_HEAD_DIMS = (16, 32, 64, 128, 256)


def qkv_reason(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, selection,
               head_dims: Sequence[int], dtypes: Sequence[torch.dtype], allowed_label: str = "allowed",
               one_query: bool = False) -> str | None:
    """Why `query [B, Hq, Lq, D]`, `key`/`value [B, Hkv, Lk, D]` and `selection` (its `indices`, and
    `counts` where it has them) do not fit together or an executor taking `head_dims` and `dtypes`,
    or None. `one_query`: a decode step (Lq must be 1)."""
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return "query/key/value must be 4D [B, H, L, D]"
    b, hq, lq, d = query.shape
    if one_query and lq != 1:
        return f"decode attention takes one query token, got {lq}"
    kb, hkv, lk, dk = key.shape
    if kb != b or tuple(value.shape[:3]) != (kb, hkv, lk):
        return f"key {tuple(key.shape)} / value {tuple(value.shape)} / query {tuple(query.shape)} disagree"
    if dk != d:
        return f"key head dim {dk} != query head dim {d}"
    if d not in head_dims or value.shape[-1] not in head_dims:
        return f"head dim {d} (value {value.shape[-1]}) not supported; {allowed_label}: {tuple(head_dims)}"
    if hkv == 0 or hq % hkv:
        return f"query heads ({hq}) must be a multiple of key/value heads ({hkv})"
    if query.dtype not in dtypes or key.dtype != query.dtype or value.dtype != query.dtype:
        return f"dtypes {query.dtype}/{key.dtype}/{value.dtype}: need one of {tuple(dtypes)}, all equal"
    devices = {query.device, key.device, value.device, selection.indices.device, selection.counts.device}
    if len(devices) > 1:
        return "query, key, value and selection must be on one device"
    return None


def pad_to(x: torch.Tensor, length: int, dim: int = 2) -> torch.Tensor:
    """`x` zero-padded along `dim` to `length` (returned as is when already that long)."""
    missing = length - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x, x.new_zeros(shape)], dim=dim)
