"""HeSS step 3 (methods.md §4.2, step 5): redistribute a fixed average density across heads.

Each head n offers G settings with density `d[n, g]` and cost `c[n, g]` (its sensitivity-weighted
error). Choose one setting per head so that the mean density reaches the target and the total cost is
least: a multiple-choice knapsack, solved by its Lagrangian relaxation — per head the lower convex hull
of (density, cost), then greedy moves in decreasing order of cost saved per unit of density (the
marginal gain) until the mean density reaches the target. The greedy is optimal at the densities it
stops at (up to one head's last step, which it keeps or undoes, whichever lands nearer the target).
"""

from __future__ import annotations

import heapq

import torch


def _hull(d: list[float], c: list[float]) -> list[int]:
    """Indices of the lower convex hull of the points (d, c), by increasing density (ties: least cost)."""
    order = sorted(range(len(d)), key=lambda g: (d[g], c[g]))
    pts: list[int] = []
    for g in order:
        if pts and d[pts[-1]] == d[g]:
            continue  # same density, higher cost
        while len(pts) >= 2:
            a, b = pts[-2], pts[-1]
            # b lies on or above the segment a–g: not on the lower hull
            if (c[b] - c[a]) * (d[g] - d[a]) >= (c[g] - c[a]) * (d[b] - d[a]):
                pts.pop()
            else:
                break
        pts.append(g)
    return pts


def allocate(density: torch.Tensor, cost: torch.Tensor, target: float) -> torch.Tensor:
    """`[N]` index of the setting chosen for each of N heads (`density`, `cost`: `[N, G]`), such that the
    mean density is the one nearest `target` the greedy reaches, at least cost. ValueError when the
    target lies outside what the settings reach (the sparsest or densest setting of every head)."""
    if density.shape != cost.shape or density.dim() != 2 or density.numel() == 0:
        raise ValueError(f"density and cost must be the same non-empty [heads, settings] shape, got "
                         f"{tuple(density.shape)} and {tuple(cost.shape)}")
    d, c = density.double().tolist(), cost.double().tolist()
    n = len(d)
    lo, hi = sum(min(row) for row in d) / n, sum(max(row) for row in d) / n
    if not lo - 1e-9 <= target <= hi + 1e-9:
        raise ValueError(f"average density {target:g} is outside what the knob reaches on the calibration prompts: "
                         f"{lo:.4f} (every head at its sparsest setting) to {hi:.4f} (every head at its densest)")
    hulls = [_hull(dr, cr) for dr, cr in zip(d, c, strict=True)]
    pos = [0] * n
    total = sum(d[i][h[0]] for i, h in enumerate(hulls))
    heap = []

    def push(i: int) -> None:
        h, k = hulls[i], pos[i]
        if k + 1 < len(h):
            a, b = h[k], h[k + 1]
            heapq.heappush(heap, (-(c[i][a] - c[i][b]) / (d[i][b] - d[i][a]), i))

    for i in range(n):
        push(i)
    last = None
    while total / n < target - 1e-12 and heap:
        _, i = heapq.heappop(heap)
        a, b = hulls[i][pos[i]], hulls[i][pos[i] + 1]
        total += d[i][b] - d[i][a]
        pos[i] += 1
        last = (i, d[i][b] - d[i][a])
        push(i)
    if last is not None and abs((total - last[1]) / n - target) < abs(total / n - target):
        pos[last[0]] -= 1
    return torch.tensor([hulls[i][pos[i]] for i in range(n)], dtype=torch.long)
