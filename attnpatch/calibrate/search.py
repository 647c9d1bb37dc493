"""Per-head search of a method's knob against an output-error tolerance, on recorded layer inputs.

For every head at once: bisection on the knob's density coordinate t ∈ [0, 1] (0: the sparsest end of
its range, 1: the densest), keeping the sparsest t whose mean relative output error over the prompts
(‖sparse − dense‖ / ‖dense‖ per head, the fidelity probe's measure) is within the tolerance. Heads are
independent: a head's selection depends only on its own option value, and its error only on its
selection. Assumes the error falls as t rises (true of thresholds and coverage targets up to ties). A head
over the tolerance even at the densest end of the knob's range gets the method's full-density options
(`full_density`: the knob's value, e.g. s2o's τ = 0, and its other per-head options, e.g. ProxyAttn's
min_blocks) where their measured error is within it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from attnpatch.backends import BACKENDS
from attnpatch.calibrate.block_partials import BlockPartials, attend_in_row_chunks
from attnpatch.calibrate.layer_select import EstimateCache, reuses_estimate, select_on
from attnpatch.calibrate.record import LayerInputs
from attnpatch.eval.fidelity import exact_attention, relative_error
from attnpatch.methods.base import DenseFallback
from attnpatch.options import Knob
from attnpatch.registry import MethodInfo
from attnpatch.sparsity import BlockSelection, KeyBounds

REFERENCE = BACKENDS["reference"]


@dataclass
class HeadFit:
    """Per query head of one layer: the knob value chosen, and its mean error and density there."""

    values: list[float]
    error: list[float]
    density: list[float]
    extra: dict[str, list[float]] = field(default_factory=dict)  # other per-head options the fallback set


_MASKED_ELEMENTS = 1 << 28  # up to this many (batch · head · query · key) elements, run the selection as a mask


def masked_block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, selection: BlockSelection, scale: float,
                           bounds: KeyBounds) -> torch.Tensor:
    """A block selection as a token mask through SDPA (float32): equal to the reference executor (tested);
    used on small inputs only, O(Hq · Lq · Lk) memory."""
    b, _, lq, _ = q.shape
    lk = k.shape[2]
    blocks = selection.to_block_mask()  # [B, Hq, R, C]
    mask = blocks.repeat_interleave(selection.block_q, 2)[:, :, :lq].repeat_interleave(selection.block_k, 3)[..., :lk]
    return exact_attention(q, k, v, scale, mask & bounds.dense_mask(b, lq, lk, q.device))


_WINDOW_ROWS = 1024  # query rows per chunk of a sliding-window layer's dense attention


def dense_outputs(layer: LayerInputs) -> list[torch.Tensor]:
    """Exact float32 attention of each recorded prompt of the layer (causal + its bounds); a sliding-window
    layer in row chunks over the keys each chunk's window reaches (O(L · window), no L × L mask)."""
    out = []
    for q, k, v, bounds in zip(layer.query, layer.key, layer.value, layer.bounds, strict=True):
        plain = bounds.is_plain and q.shape[2] == k.shape[2]
        if bounds.window is not None and bounds.mask is None and bounds.causal:
            out.append(_windowed_attention(q, k, v, layer.scale, bounds))
            continue
        out.append(exact_attention(q, k, v, layer.scale, None if plain else
                                   bounds.dense_mask(q.shape[0], q.shape[2], k.shape[2], q.device)))
    return out


def _windowed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, bounds: KeyBounds
                        ) -> torch.Tensor:
    b, _, lq, _ = q.shape
    lk = k.shape[2]
    out = torch.empty(*q.shape[:3], v.shape[-1], device=q.device)
    for r0 in range(0, lq, _WINDOW_ROWS):
        r1 = min(lq, r0 + _WINDOW_ROWS)
        k0, k1 = max(0, lk - lq + r0 - bounds.window + 1), lk - lq + r1
        mask = bounds.rows_mask(b, lq, lk, (r0, r1), (k0, k1), q.device).unsqueeze(1)
        out[:, :, r0:r1] = exact_attention(q[:, :, r0:r1], k[:, :, k0:k1], v[:, :, k0:k1], scale, mask)
    return out


def evaluate(info: MethodInfo, options: Mapping[str, Any], layer: LayerInputs, dense: list[torch.Tensor],
             cache: EstimateCache | None = None, partials: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`([Hq] mean relative error, [Hq] mean density)` of the method with `options` on the layer's prompts
    (`cache`: block scores shared across calls, `attnpatch.calibrate.layer_select`; `partials`: a dict in
    which each prompt's `BlockPartials` are kept across calls, so block selections attend in O(Lq·C·D))."""
    return evaluate_many(info, [options], layer, dense, partials, cache)[0]


def evaluate_many(info: MethodInfo, options: Sequence[Mapping[str, Any]], layer: LayerInputs,
                  dense: list[torch.Tensor], partials: dict | None = None, cache: EstimateCache | None = None
                  ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`evaluate` for several option sets: on a prompt too long for cached `partials`, their block
    selections share one row-chunked exact pass (`attend_in_row_chunks`) instead of one pass each."""
    hq = layer.query[0].shape[1]
    methods = [info.build(o, hq, where=f" (layer {layer.layer})") for o in options]
    sums = torch.zeros(len(methods), 2, hq, dtype=torch.float64)
    for i, (q, k, v, bounds) in enumerate(zip(layer.query, layer.key, layer.value, layer.bounds, strict=True)):
        sels = [select_on(m, layer, i, cache) for m in methods]
        blocks = [j for j, sel in enumerate(sels) if isinstance(sel, BlockSelection)]
        shared = len(blocks) > 1 and len({(sels[j].block_q, sels[j].block_k) for j in blocks}) == 1 and \
            not (partials is not None and BlockPartials.fits(q, k, v, sels[blocks[0]].block_k))
        done = {}
        if shared:
            outs = attend_in_row_chunks(q, k, v, layer.scale, bounds, [sels[j] for j in blocks])
            done = {j: _scores_of(sels[j], out, dense[i], skipped)
                    for j, (out, skipped) in zip(blocks, outs, strict=True)}
        for j, sel in enumerate(sels):
            sums[j] += torch.stack(done[j] if j in done else _score(layer, i, sel, dense[i], partials))
    n = len(layer.query)
    return [(row[0] / n, row[1] / n) for row in sums]


def _scores_of(selection, out: torch.Tensor, ref: torch.Tensor, skipped: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """`([Hq] relative error, [Hq] density)` of a selection's output; a block selection's `skipped` tiles
    are not computed."""
    kept, total = selection.kept_and_total()
    if skipped is not None:
        kept = kept - skipped.sum(dim=(0, 2, 3)).to(kept)
    return relative_error(out, ref).mean(0).double().cpu(), (kept / total).double().cpu()


def _score(layer: LayerInputs, i: int, selection, ref: torch.Tensor, partials: dict | None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """`([Hq] relative error, [Hq] density)` of one selection on prompt `i`: through the prompt's cached
    `BlockPartials` where they fit, a row-chunked exact pass for a skip rule, a masked or gathered
    attention otherwise."""
    q, k, v, bounds = layer.query[i], layer.key[i], layer.value[i], layer.bounds[i]
    hq = q.shape[1]
    if isinstance(selection, DenseFallback):
        return torch.zeros(hq, dtype=torch.float64), torch.ones(hq, dtype=torch.float64)
    if isinstance(selection, BlockSelection):
        skipped = None
        if partials is not None and BlockPartials.fits(q, k, v, selection.block_k):
            if (i, selection.block_k) not in partials:
                partials[(i, selection.block_k)] = BlockPartials.compute(q, k, v, layer.scale, bounds,
                                                                         selection.block_k)
            part = partials[(i, selection.block_k)]
            skipped = part.skipped(selection) if selection.skip is not None else None
            out = part.attend(selection, skipped)
        elif selection.skip is not None:  # which tiles are skipped follows from the exact row maxima
            [(out, skipped)] = attend_in_row_chunks(q, k, v, layer.scale, bounds, [selection])
        elif q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] <= _MASKED_ELEMENTS:
            out = masked_block_attention(q, k, v, selection, layer.scale, bounds)
        else:
            out = REFERENCE.prefill(q, k, v, selection, scale=layer.scale, bounds=bounds)
        return _scores_of(selection, out, ref, skipped)
    return _scores_of(selection, REFERENCE.prefill(q, k, v, selection, scale=layer.scale, bounds=bounds), ref)


def search_layer(info: MethodInfo, knob: Knob, base: Mapping[str, Any], layer: LayerInputs, tolerance: float | None,
                 steps: int = 8, *, density: float | None = None) -> HeadFit:
    """Bisection of `knob` per head (see the module docstring); `base`: the method's other options.

    With `tolerance`: each head's sparsest value whose mean error is within it. With `density` instead:
    each head's value whose mean density is nearest `density` among the two ends of the final bracket
    (density rises with the coordinate; a head that cannot reach it ends at the nearest end)."""
    if (tolerance is None) == (density is None):
        raise ValueError("give exactly one of tolerance (output error) or density (kept share) to search_layer")
    hq = layer.query[0].shape[1]
    dense = dense_outputs(layer)
    cache: EstimateCache | None = {} if reuses_estimate(info, knob.option) else None  # one estimate per prompt
    partials: dict = {}  # each prompt's softmax partials per key block, shared by the bisection's steps
    lo, hi = torch.zeros(hq, dtype=torch.float64), torch.ones(hq, dtype=torch.float64)
    best_err, best_den = torch.full_like(lo, float("nan")), torch.full_like(lo, float("nan"))
    lo_err, lo_den = torch.full_like(lo, float("nan")), torch.full_like(lo, float("nan"))
    for _ in range(steps):
        mid = (lo + hi) / 2
        err, den = evaluate(info, {**base, knob.option: knob.value(mid).tolist()}, layer, dense, cache, partials)
        ok = err <= tolerance if tolerance is not None else den >= density
        hi, lo = torch.where(ok, mid, hi), torch.where(ok, lo, mid)
        best_err, best_den = torch.where(ok, err, best_err), torch.where(ok, den, best_den)
        lo_err, lo_den = torch.where(ok, lo_err, err), torch.where(ok, lo_den, den)
    if bool(torch.isnan(best_err).any()):  # heads never within the target: measure them at the densest end
        err, den = evaluate(info, {**base, knob.option: knob.value(hi).tolist()}, layer, dense, cache, partials)
        missing = torch.isnan(best_err)
        best_err, best_den = torch.where(missing, err, best_err), torch.where(missing, den, best_den)
    coord = hi
    if density is not None:  # the bracket end nearer the target density (lo only where it was measured)
        use_lo = ~torch.isnan(lo_den) & ((lo_den - density).abs() < (best_den - density).abs())
        coord = torch.where(use_lo, lo, hi)
        best_err, best_den = torch.where(use_lo, lo_err, best_err), torch.where(use_lo, lo_den, best_den)
    values = knob.value(coord)
    full = info.cls.full_density.get(knob.option)
    over = best_err > tolerance if tolerance is not None else torch.zeros_like(best_err, dtype=torch.bool)
    extra: dict[str, list[float]] = {}
    if full is not None and bool(over.any()):
        # Heads over the tolerance even at the densest end of the range: the method's full-density
        # options (the knob's, e.g. s2o's τ = 0, and its other per-head ones, e.g. ProxyAttn's
        # min_blocks), kept where their measured error is within the tolerance.
        others = {name: torch.tensor([float(v)] * len(values), dtype=torch.float64)
                  for name, v in _fixed_per_head(info, base, knob).items()}
        trial = torch.where(over, torch.full_like(values, float(full)), values)
        trial_others = {name: torch.where(over, torch.full_like(v, float(info.cls.full_density[name])), v)
                        for name, v in others.items()}
        options = {**base, knob.option: trial.tolist(), **{n: v.tolist() for n, v in trial_others.items()}}
        err, den = evaluate(info, options, layer, dense, cache, partials)
        take = over & (err <= tolerance)
        values = torch.where(take, trial, values)
        best_err, best_den = torch.where(take, err, best_err), torch.where(take, den, best_den)
        if bool(take.any()):
            extra = {n: torch.where(take, trial_others[n], others[n]).tolist() for n in others}
    return HeadFit(values.tolist(), best_err.tolist(), best_den.tolist(), extra)


def _fixed_per_head(info: MethodInfo, base: Mapping[str, Any], knob: Knob) -> dict[str, float]:
    """The method's per-head options in `full_density` other than the knob, at their value in `base`
    (or the default): what a fallback head changes besides the knob."""
    out = {}
    for name in info.cls.full_density:
        if name == knob.option or not info.spec(name).per_head:
            continue
        value = base.get(name, info.spec(name).default)
        if isinstance(value, list | tuple):
            return {}  # already per head (a user's table): leave the fallback to the knob
        out[name] = float(value)
    return out
