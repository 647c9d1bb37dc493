"""BLASST's λ = a / L fit (methods.md §1.2): per prompt, the largest λ on a grid whose mean relative
attention-output error stays within the tolerance (or whose skipped share reaches a target), then
the least-squares `a` of λ ≈ a / L over all prompts and lengths. Prefill only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from attnpatch.calibrate.record import LayerInputs
from attnpatch.calibrate.search import dense_outputs, evaluate
from attnpatch.registry import get_method


@dataclass
class LambdaFit:
    """The fitted `a`, each prompt's (length, best λ), and the skipped share and output error per length
    at the fitted `a` and at one fixed λ (the median of the best λs), to show which keeps sparsity steady."""

    a: float
    points: list[tuple[int, float]] = field(default_factory=list)
    skipped_at_a: dict[int, float] = field(default_factory=dict)
    error_at_a: dict[int, float] = field(default_factory=dict)
    fixed_lambda: float = 0.0
    skipped_at_fixed_lambda: dict[int, float] = field(default_factory=dict)
    error_at_fixed_lambda: dict[int, float] = field(default_factory=dict)


def _one_prompt(layers: dict[int, LayerInputs], i: int) -> dict[int, LayerInputs]:
    return {n: LayerInputs(n, r.scale, r.window, [r.query[i]], [r.key[i]], [r.value[i]], [r.bounds[i]])
            for n, r in layers.items()}


def _measure(layers: dict[int, LayerInputs], a: float, block: int, dense) -> tuple[float, float]:
    """(mean error, mean skipped share) over every layer and head of one prompt."""
    info = get_method("blasst", "prefill")
    errs, dens = [], []
    for n, layer in layers.items():
        err, den = evaluate(info, {"a": a, "block_size": block}, layer, dense[n])
        errs.append(err.mean())
        dens.append(den.mean())
    return float(torch.stack(errs).mean()), 1.0 - float(torch.stack(dens).mean())


def fit_lambda(layers: dict[int, LayerInputs], grid: Sequence[float], tolerance: float | None = None,
               target_skipped: float | None = None, block: int = 128) -> LambdaFit:
    """Fit `a` in λ = a / L on recorded prompts of several lengths (each prompt one entry per layer).

    Exactly one of `tolerance` (largest λ with mean output error within it) or `target_skipped`
    (smallest λ that skips at least that share of the causal tiles, the a(S) of a sparsity target)."""
    if (tolerance is None) == (target_skipped is None):
        raise ValueError("give exactly one of tolerance (output error) or target_skipped (a share in (0, 1))")
    grid = sorted(float(x) for x in grid)
    if not grid or grid[0] <= 0:
        raise ValueError(f"the λ grid must hold positive values, got {list(grid)}")
    prompts = len(next(iter(layers.values())).query)
    points, per_prompt = [], []
    for i in range(prompts):
        one = _one_prompt(layers, i)
        dense = {n: dense_outputs(r) for n, r in one.items()}
        length = one[next(iter(one))].key[0].shape[2]
        best = grid[0]
        for lam in grid:
            err, skipped = _measure(one, lam * length, block, dense)
            ok = err <= tolerance if tolerance is not None else skipped >= target_skipped
            if tolerance is not None and ok:
                best = lam
            if target_skipped is not None and ok:
                best = lam
                break
        points.append((length, best))
        per_prompt.append((one, dense, length))
    inv = torch.tensor([1.0 / n for n, _ in points], dtype=torch.float64)
    lam = torch.tensor([x for _, x in points], dtype=torch.float64)
    a = float((lam * inv).sum() / (inv * inv).sum())
    fixed = float(lam.median())
    fit = LambdaFit(a, points, fixed_lambda=fixed)
    sums: dict[tuple[str, int], list[float]] = {}
    for one, dense, length in per_prompt:
        for tag, value in (("a", a), ("fixed", fixed * length)):
            err, skipped = _measure(one, value, block, dense)
            sums.setdefault((tag + "_skipped", length), []).append(skipped)
            sums.setdefault((tag + "_error", length), []).append(err)
    mean = {key: sum(v) / len(v) for key, v in sums.items()}
    fit.skipped_at_a = {n: v for (k, n), v in mean.items() if k == "a_skipped"}
    fit.error_at_a = {n: v for (k, n), v in mean.items() if k == "a_error"}
    fit.skipped_at_fixed_lambda = {n: v for (k, n), v in mean.items() if k == "fixed_skipped"}
    fit.error_at_fixed_lambda = {n: v for (k, n), v in mean.items() if k == "fixed_error"}
    return fit
