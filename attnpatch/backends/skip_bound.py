"""BLASST's skip bound as the kernels take it.

There is one convention everywhere (methods, backends, kernels; see `SkipRule`): the bound is
ln λ on *scaled* natural-log scores σ·q·k — a visited tile is skipped when, for every row,
``tile_row_max − running_row_max < bound``. Kernels that keep base-2 scores multiply it by log2 e.
A float or a ``[Hq]`` tensor; ``-inf`` never skips. A NaN bound is refused on CPU; a device tensor is
not read back (a decode step makes no host sync), and a NaN there never skips (comparisons are false).
"""

from __future__ import annotations

import math

import torch

_LOG2E = 1.4426950408889634


def bound_scalar(skip_bound: float, base2: bool = False) -> float:
    """One bound as a Python float, in base 2 when asked."""
    bound = float(skip_bound)
    if math.isnan(bound):
        raise ValueError("the skip bound is NaN")
    return bound * _LOG2E if base2 else bound


def bound_per_head(skip_bound: float | torch.Tensor, hq: int, device: torch.device, base2: bool = False
                   ) -> torch.Tensor:
    """The bound per query head, ``[Hq]`` float32; a tensor holds 1 or ``Hq`` values."""
    if not isinstance(skip_bound, torch.Tensor):
        return torch.full((hq,), bound_scalar(skip_bound, base2), dtype=torch.float32, device=device)
    t = skip_bound.detach().to(device=device, dtype=torch.float32).reshape(-1)
    if t.numel() == 1:
        t = t.expand(hq)
    elif t.numel() != hq:
        raise ValueError(f"skip bound tensor must hold 1 or Hq={hq} values, got {t.numel()}")
    if t.device.type == "cpu" and bool(torch.isnan(t).any()):  # checked where it costs no device sync
        raise ValueError("the skip bound holds NaN")
    return (t * _LOG2E if base2 else t).contiguous()
