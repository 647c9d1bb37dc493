"""A method's selection on one recorded prompt of a layer, with the estimate reused across knob values.

Calibration tries many values of one option (the knob) on the same recorded Q/K. For a score-based method
whose estimate ignores the knob (`EstimatedPrefill.estimate_ignores`: the selector's parameter) the block
scores of each prompt are computed once and kept in an `EstimateCache`; only the selection runs again.
"""

from __future__ import annotations

from attnpatch.calibrate.record import LayerInputs
from attnpatch.methods.base import DenseFallback, PrefillContext, PrefillMethod
from attnpatch.methods.estimated import BlockScores, EstimatedPrefill
from attnpatch.registry import MethodInfo

EstimateCache = dict[int, BlockScores | None]  # prompt index -> the layer's block scores on it


def reuses_estimate(info: MethodInfo, option: str) -> bool:
    """Whether the method's estimate can be shared by every value of `option`."""
    return issubclass(info.cls, EstimatedPrefill) and info.cls.estimate_ignores(option)


def select_on(method: PrefillMethod, layer: LayerInputs, i: int, cache: EstimateCache | None = None):
    """The selection (or DenseFallback) of a built method on prompt `i` of the layer; with a `cache`, the
    prompt's block scores are estimated once and reused (only pass one when `reuses_estimate` holds for
    the option being varied)."""
    q, k, bounds = layer.query[i], layer.key[i], layer.bounds[i]
    ctx = PrefillContext(layer.layer, layer.scale, bounds, layer.window)
    if cache is None or not isinstance(method, EstimatedPrefill):
        return method.select(q, k, ctx)
    reason = method.dense_reason(q.shape[2], k.shape[2], ctx)
    if reason is not None:
        return DenseFallback(reason)
    if i not in cache:
        cache[i] = method.estimate(q, k, ctx)
    return method.select_scores(q, k, ctx, cache[i])
