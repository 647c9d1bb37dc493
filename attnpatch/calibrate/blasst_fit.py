"""BLASST's λ = a / L fit (methods.md §1.2): per prompt, the largest λ on a grid whose mean relative
attention-output error stays within the tolerance (or whose skipped share reaches a target), then
the least-squares `a` of λ ≈ a / L over all prompts and lengths, fitted on log λ (`_least_squares_a`).

Per phase (`lambda_table`): prefill skips key tiles of each recorded prompt; decode is measured on the
recorded prompts' last positions, each query row a decode step over the keys up to it (exactly what
BLASST decode sees at that cache length), skipping pages. One table per phase serves the tolerance fit,
a sparsity-target fit and the a(S) table a profile carries for run-time sparsity targets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from attnpatch.calibrate.record import LayerInputs
from attnpatch.calibrate.search import dense_outputs, evaluate_many
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


def _measure(layers: dict[int, LayerInputs], a_values: Sequence[float], block: int, dense) -> list[tuple[float, float]]:
    """Per `a` of `a_values`: (mean error, mean skipped share) over every layer and head of one prompt. Layer
    by layer, so one layer's exact softmax partials (`BlockPartials`, cached or row-chunked on long prompts)
    serve every `a` and are then freed."""
    info = get_method("blasst", "prefill")
    errs = [[] for _ in a_values]
    dens = [[] for _ in a_values]
    for n, layer in layers.items():
        results = evaluate_many(info, [{"a": a, "block_size": block} for a in a_values], layer, dense[n], partials={})
        for j, (err, den) in enumerate(results):
            errs[j].append(err.mean())
            dens[j].append(den.mean())
    return [(float(torch.stack(e).mean()), 1.0 - float(torch.stack(d).mean())) for e, d in zip(errs, dens, strict=True)]


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
        for lam, (err, skipped) in zip(grid, _measure(one, [lam * length for lam in grid], block, dense), strict=True):
            ok = err <= tolerance if tolerance is not None else skipped >= target_skipped
            if tolerance is not None and ok:
                best = lam
            if target_skipped is not None and ok:
                best = lam
                break
        points.append((length, best))
        per_prompt.append((one, dense, length))
    a = _least_squares_a(points)
    fixed = float(torch.tensor([x for _, x in points], dtype=torch.float64).median())
    fit = LambdaFit(a, points, fixed_lambda=fixed)
    sums: dict[tuple[str, int], list[float]] = {}
    for one, dense, length in per_prompt:
        for tag, (err, skipped) in zip(("a", "fixed"), _measure(one, [a, fixed * length], block, dense), strict=True):
            sums.setdefault((tag + "_skipped", length), []).append(skipped)
            sums.setdefault((tag + "_error", length), []).append(err)
    mean = {key: sum(v) / len(v) for key, v in sums.items()}
    fit.skipped_at_a = {n: v for (k, n), v in mean.items() if k == "a_skipped"}
    fit.error_at_a = {n: v for (k, n), v in mean.items() if k == "a_error"}
    fit.skipped_at_fixed_lambda = {n: v for (k, n), v in mean.items() if k == "fixed_skipped"}
    fit.error_at_fixed_lambda = {n: v for (k, n), v in mean.items() if k == "fixed_error"}
    return fit


# -- per phase tables: one pass over the λ grid serves the tolerance fit, the sparsity fit and a(S) --------

@dataclass
class LambdaTable:
    """Per calibration prompt (its length) and per λ of `grid`: the mean relative output error and the
    skipped share of one phase (prefill key tiles, or decode pages over the last `steps` positions)."""

    phase: str
    grid: list[float]
    lengths: list[int]
    error: list[list[float]]
    skipped: list[list[float]]


def _decode_measure(layers: dict[int, LayerInputs], i: int, a: float, page: int, steps: int) -> tuple[float, float]:
    """(mean error, skipped share of the visited pages) of BLASST decode with `a` on prompt `i`: each of
    its last `steps` query rows is a decode step over the keys up to it (cache length = position + 1)."""
    from attnpatch.backends import BACKENDS
    from attnpatch.eval.fidelity import exact_attention, relative_error
    from attnpatch.methods.base import DecodeContext
    from attnpatch.sparsity import KeyBounds

    info = get_method("blasst", "decode")
    errs, counts = [], torch.zeros(2, dtype=torch.int64)
    for n, r in layers.items():
        q_all, k_all, v_all = r.query[i], r.key[i], r.value[i]
        hq, length = q_all.shape[1], k_all.shape[2]
        method = info.build({"a": a, "page_size": page}, hq, where=f" (layer {n})")
        for pos in range(max(0, length - steps), length):
            q, k, v = q_all[:, :, pos:pos + 1], k_all[:, :, :pos + 1], v_all[:, :, :pos + 1]
            ctx = DecodeContext(n, r.scale, KeyBounds(), r.window)
            selection = method.select(q, k, ctx)
            ref = exact_attention(q, k, v, r.scale, torch.ones(1, 1, 1, pos + 1, dtype=torch.bool, device=q.device))
            if selection is None:
                errs.append(0.0)
                continue
            tc = torch.zeros(2, dtype=torch.int64, device=q.device)
            out = BACKENDS["reference"].decode(q, k, v, selection, scale=r.scale, bounds=KeyBounds(), tile_counts=tc)
            errs.append(float(relative_error(out, ref).mean()))
            counts += tc.cpu()
    return sum(errs) / max(1, len(errs)), float(counts[1]) / max(1, int(counts[0]))


def lambda_table(layers: dict[int, LayerInputs], grid: Sequence[float], phase: str = "prefill", block: int = 128,
                 steps: int = 16) -> LambdaTable:
    """Measure every prompt at every λ of `grid` (a = λ · its length) in `phase` ("prefill": tiles of
    `block` keys; "decode": pages of `block` keys over the prompt's last `steps` positions)."""
    if phase not in ("prefill", "decode"):
        raise ValueError(f"phase must be 'prefill' or 'decode', got {phase!r}")
    grid = sorted(float(x) for x in grid)
    if not grid or grid[0] <= 0:
        raise ValueError(f"the λ grid must hold positive values, got {list(grid)}")
    prompts = len(next(iter(layers.values())).query)
    table = LambdaTable(phase, grid, [], [], [])
    for i in range(prompts):
        length = next(iter(layers.values())).key[i].shape[2]
        one = _one_prompt(layers, i) if phase == "prefill" else None
        dense = {n: dense_outputs(r) for n, r in one.items()} if one is not None else None
        points = (_measure(one, [lam * length for lam in grid], block, dense) if one is not None
                  else [_decode_measure(layers, i, lam * length, block, steps) for lam in grid])
        errs, skips = [e for e, _ in points], [x for _, x in points]
        table.lengths.append(length)
        table.error.append(errs)
        table.skipped.append(skips)
    return table


def _hull_crossing(grid: list[float], values: list[float], level: float, strict: bool) -> float:
    """The λ where the monotone hull (running max) of `values` measured on `grid` crosses `level`: first
    exceeds it (`strict`) or first reaches it, interpolated in log λ from the grid point before; the grid's
    first λ where the first value is already past, its last where none is."""
    hull = torch.tensor(values, dtype=torch.float64).cummax(0).values.tolist()

    def past(x: float) -> bool:
        return x > level if strict else x >= level

    if past(hull[0]):
        return grid[0]
    for j in range(1, len(grid)):
        if past(hull[j]):
            w = (level - hull[j - 1]) / max(hull[j] - hull[j - 1], 1e-12)
            return math.exp(math.log(grid[j - 1]) + w * (math.log(grid[j]) - math.log(grid[j - 1])))
    return grid[-1]


def _lambda_for_share(grid: list[float], skipped: list[float], share: float) -> float:
    """The smallest λ whose skipped share reaches `share` (`_hull_crossing` on the shares)."""
    return _hull_crossing(grid, skipped, share, strict=False)


def _lambda_within(grid: list[float], errors: list[float], tolerance: float) -> float:
    """The largest λ whose error is within `tolerance` (`_hull_crossing` on the errors: where they first
    exceed it); the grid's first λ where none is, its last where all are."""
    return _hull_crossing(grid, errors, tolerance, strict=True)


def _least_squares_a(points: list[tuple[int, float]]) -> float:
    """The least-squares `a` of `log λ = log a − log L` over the (length, λ) points: the geometric mean of
    the per-prompt `λ · L`. Chosen over least squares on λ itself, which is a mean weighted towards the
    largest λ: the per-prompt λs span decades (a log-spaced grid), and on SmolLM2 the linear fit let the
    one loosest calibration prompt set `a` (text λ 0.1 against passkey λ 0.01: a = 217, held-out error
    0.056 against the 0.05 target; seventh session, bench/results/README.md)."""
    logs = torch.tensor([math.log(x * n) for n, x in points], dtype=torch.float64)
    return float(logs.mean().exp())


LAMBDA_FITS = ("geomean", "every")


def fit_table(table: LambdaTable, tolerance: float | None = None, target_skipped: float | None = None,
              rule: str = "geomean") -> tuple[float, list[tuple[int, float]]]:
    """`(a, [(length, λ) per prompt])`: per prompt the largest λ whose error is within `tolerance`
    (`_lambda_within`: interpolated between grid points, the smallest grid λ where none qualifies), or the
    λ reaching `target_skipped`; then λ ≈ a / L. Interpolated because the grid's 3× steps kept a grid λ up
    to 3× below the prompt's limit (Gemma-3-270m's passkey prompts at 16K: grid 0.003, interpolated 0.0046).

    `rule` combines the prompts' λ · L: "geomean" (`_least_squares_a`, a typical prompt: about half the
    calibration prompts end above the tolerance) or "every" (their minimum, for a tolerance only: every
    calibration prompt within it — a bound rather than a typical value, at a higher density). On
    Gemma-3-270m at 16K the two prompt kinds' limits differ tenfold (text 0.03, passkey 0.003 on the grid),
    and the geometric mean left held-out prompts (two passkey, one text) at error 0.057 for a 0.05 target;
    "every" held them at 0.027 (bench/results/README.md, thirteenth session)."""
    if (tolerance is None) == (target_skipped is None):
        raise ValueError("give exactly one of tolerance (output error) or target_skipped (a share in (0, 1))")
    if rule not in LAMBDA_FITS:
        raise ValueError(f"the λ fit rule must be one of {', '.join(LAMBDA_FITS)}, got {rule!r}")
    if rule == "every" and tolerance is None:
        raise ValueError("the λ fit rule 'every' bounds an output error: give a tolerance, not target_skipped")
    points = []
    for length, errs, skips in zip(table.lengths, table.error, table.skipped, strict=True):
        if tolerance is not None:
            points.append((length, _lambda_within(table.grid, errs, tolerance)))
        else:
            points.append((length, _lambda_for_share(table.grid, skips, target_skipped)))
    if rule == "every":
        return min(lam * length for length, lam in points), points
    return _least_squares_a(points), points


SHARES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def a_of_s(table: LambdaTable, shares: Sequence[float] = SHARES) -> list[list[float]]:
    """`[[S, a(S)], ...]`: the fitted `a` for each skipped-share target S that some prompt reaches on
    the grid (shares beyond every prompt's largest measured share are left out: not extrapolated)."""
    top = min(max(s) for s in table.skipped)
    return [[float(s), fit_table(table, target_skipped=s)[0]] for s in shares if s <= top]


def measure_at(layers: dict[int, LayerInputs], a: float, phase: str, block: int = 128, steps: int = 16
               ) -> dict[str, float]:
    """Mean output error and skipped share of every prompt at one `a` (the fitted one) in `phase`."""
    prompts = len(next(iter(layers.values())).query)
    errs, skips = [], []
    for i in range(prompts):
        if phase == "prefill":
            one = _one_prompt(layers, i)
            [(err, skipped)] = _measure(one, [a], block, {n: dense_outputs(r) for n, r in one.items()})
        else:
            err, skipped = _decode_measure(layers, i, a, block, steps)
        errs.append(err)
        skips.append(skipped)
    return {"error": sum(errs) / prompts, "skipped": sum(skips) / prompts}
