"""Selectors: turn block scores into kept blocks, per head. Each takes scores `[B, H, R, C]` (higher =
more important; blocks outside `allowed` are ignored) and one parameter per head `[H]`, and returns a
boolean `[B, H, R, C]`. Forced regions and clipping are the caller's (the estimate → select base)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch


def _per_head(param: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    return param.to(scores.device, torch.float32).view(1, -1, 1, 1)


@dataclass(frozen=True)
class TopK:
    """Keep the `k` highest-scoring allowed blocks of every query block. The parameter is a count of
    blocks (`fraction=False`) or a share of the row's allowed blocks (`fraction=True`, rounded up)."""

    param: str
    fraction: bool = False
    kind: ClassVar[str] = "top-k budget"

    def __call__(self, scores: torch.Tensor, allowed: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        p = _per_head(param, scores)
        n_allowed = allowed.sum(-1, keepdim=True).float()
        k = torch.ceil(p * n_allowed) if self.fraction else p + torch.zeros_like(n_allowed)
        k = torch.minimum(k, n_allowed)
        s = scores.float().masked_fill(~allowed, float("-inf"))
        rank = s.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
        return (rank < k) & allowed


@dataclass(frozen=True)
class CumulativeMass:
    """Keep the fewest allowed blocks whose scores add up to at least `threshold` of the row's allowed
    total (scores are non-negative masses, e.g. pooled attention probabilities)."""

    param: str
    kind: ClassVar[str] = "cumulative mass"

    def __call__(self, scores: torch.Tensor, allowed: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        tau = _per_head(param, scores)
        s = scores.float().clamp(min=0).masked_fill(~allowed, 0.0)
        ordered, order = s.sort(dim=-1, descending=True, stable=True)
        total = ordered.sum(-1, keepdim=True)
        before = ordered.cumsum(-1) - ordered  # mass strictly before each block in that order
        keep_sorted = before < tau * total
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        return keep & allowed


@dataclass(frozen=True)
class Threshold:
    """Keep every allowed block whose score is at least `threshold`."""

    param: str
    kind: ClassVar[str] = "threshold"

    def __call__(self, scores: torch.Tensor, allowed: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        return (scores.float() >= _per_head(param, scores)) & allowed


Selector = TopK | CumulativeMass | Threshold
