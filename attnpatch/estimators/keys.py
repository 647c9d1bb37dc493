"""Which keys are real (not padding), in the form the scorers mask with: one `[B, Lk]` boolean row per
sequence, or None when every key is real."""

from __future__ import annotations

import torch

from attnpatch.sparsity import KeyBounds


def real_keys(bounds: KeyBounds, batch: int, kv_len: int, device) -> torch.Tensor | None:
    """`[B, Lk]` bool: key `j` is not padding (left padding from `key_start`, other padding from
    `key_valid`; with a tensor mask, the keys some query may see). None: no padding."""
    if bounds.mask is not None:
        return bounds.mask.to(device).any(dim=1).any(dim=1).expand(batch, kv_len)
    out = None
    if bounds.key_start is not None:
        start = bounds.key_start.to(device=device, dtype=torch.long).view(-1, 1)
        out = (torch.arange(kv_len, device=device).view(1, -1) >= start).expand(batch, kv_len)
    if bounds.key_valid is not None:
        valid = bounds.key_valid.to(device=device, dtype=torch.bool).expand(batch, kv_len)
        out = valid if out is None else out & valid
    return out


def first_real_key(bounds: KeyBounds, batch: int, kv_len: int, device) -> torch.Tensor:
    """`[B]` long: each row's first real key (0 without padding)."""
    real = real_keys(bounds, batch, kv_len, device)
    if real is None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    return real.to(torch.int8).argmax(-1)
