"""BLASST's skip threshold λ turned into the bound the kernels compare score differences with.

A tile is skipped when, for every row, ``tile_row_max − running_row_max < ln λ``, on raw ``q·k``
(``"raw"``) or on ``σ·q·k`` (``"scaled"``). The kernels keep scaled scores ``σ·q·k`` (natural log)
or ``σ·q·k·log2 e`` (base 2), so the bound is ``ln λ · σ`` (raw) or ``ln λ`` (scaled), times
``log2 e`` in base 2. ``λ <= 0`` gives ``-inf`` (never skip).
"""

from __future__ import annotations

import math

import torch

SKIP_CONVENTIONS = ("raw", "scaled")
_LOG2E = 1.4426950408889634


def check_convention(skip_convention: str, name: str = "skip_convention") -> None:
    if skip_convention not in SKIP_CONVENTIONS:
        raise ValueError(f"{name} must be one of {SKIP_CONVENTIONS}, got {skip_convention!r}")


def _factor(skip_convention: str, scale: float, base2: bool) -> float:
    check_convention(skip_convention)
    if scale <= 0:
        raise ValueError(f"skip mode needs a positive scale, got {scale}")
    return (scale if skip_convention == "raw" else 1.0) * (_LOG2E if base2 else 1.0)


def skip_bound(lam: float, skip_convention: str, scale: float, base2: bool = False) -> float:
    """The bound for one float λ, as a Python float."""
    return math.log(lam) * _factor(skip_convention, scale, base2) if lam > 0 else float("-inf")


def skip_bounds_per_head(
    skip_threshold: float | torch.Tensor,
    skip_convention: str,
    scale: float,
    hq: int,
    device: torch.device,
    base2: bool = False,
) -> torch.Tensor:
    """The bound per query head, ``[Hq]`` float32; a tensor λ holds 1 or ``Hq`` values."""
    if not isinstance(skip_threshold, torch.Tensor):
        bound = skip_bound(float(skip_threshold), skip_convention, scale, base2)
        return torch.full((hq,), bound, dtype=torch.float32, device=device)
    factor = _factor(skip_convention, scale, base2)
    lam = skip_threshold.detach().to(device=device, dtype=torch.float32).reshape(-1)
    if lam.numel() == 1:
        lam = lam.expand(hq)
    elif lam.numel() != hq:
        raise ValueError(f"skip_threshold tensor must hold 1 or Hq={hq} values, got {lam.numel()}")
    return (torch.log(lam.clamp(min=0.0)) * factor).contiguous()
