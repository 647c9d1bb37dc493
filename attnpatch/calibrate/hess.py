"""HeSS — Head Sensitivity Score budgets for LLM prefill (methods.md §4, transferred from vision to LLM
heads): per (layer, query head), how much the LM loss is expected to rise when the head is sparsified
at each setting of the method's knob, then a fixed average density redistributed across heads —
denser for sensitive heads, sparser for robust ones — and saved as a Profile.

`hess_measure(...)` records Q/K/V and attention-output gradients on calibration prompts (one forward
and one backward each, `hess_grad`) and evaluates every head on a grid of knob values (`hess_score`);
`HessCalibration.redistribute(density)` allocates the knob per head (`hess_alloc`), and
`HessCalibration.uniform(density)` makes the baseline at the same average density: one knob value for
every head, found by bisection. `hess(model, tokenizer, method, density=...)` does the first two.

Choices (methods.md §4.2 leaves them open): the sensitivity is the Fisher form `½ Σ (g·e)²` by default
(`form="diagonal"`: `½ Σ g² e²`), optionally damped (`damping`: `g gᵀ + λ I`), the sum of the
output-error and dropped-mass terms (`weights`), per
head at each knob value (not only at one reference budget), so the allocation uses each head's whole
error curve; the budget is shared across the whole model (`scope="model"`) or per layer
(`scope="layer"`). The loss is the answer's cross-entropy where the calibration data has answers
(`data="passkey"`, JSONL rows with `prompt` and `answer`: the answer is appended to the prompt), so the
gradients weigh the heads that retrieve it; the whole text's next-token loss otherwise (`text`).
Densities are measured on the calibration prompts at their length: the density of a
threshold method moves with the context length, so calibrate at the length you run.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from attnpatch.calibrate.data import calibration_samples
from attnpatch.calibrate.hess_alloc import allocate
from attnpatch.calibrate.hess_grad import record_with_grads
from attnpatch.calibrate.hess_score import FORMS, LayerCurves, kept_by, layer_curves
from attnpatch.calibrate.record import LayerInputs
from attnpatch.options import Knob
from attnpatch.profile import Profile, model_fingerprint
from attnpatch.registry import MethodInfo, get_method

SCOPES = ("model", "layer")


def _knob(method: str) -> tuple[MethodInfo, Knob]:
    from attnpatch.calibrate.run import calibratable_methods

    info = get_method(method, "prefill")
    knob = getattr(info.cls, "knob", None)
    if knob is None:
        raise ValueError(f"method {method!r} has no per-head knob to redistribute; HeSS works with: "
                         f"{', '.join(calibratable_methods())}")
    return info, knob


def _check_density(density: float) -> float:
    if isinstance(density, bool) or not isinstance(density, int | float) or not 0 < density <= 1:
        raise ValueError(f"density is the average share of causal block pairs kept, in (0, 1]; got {density!r}")
    return float(density)


@dataclass
class HessCalibration:
    """Per-layer curves of one method on recorded prompts, ready to be turned into profiles."""

    info: MethodInfo
    knob: Knob
    base: dict[str, Any]
    t: torch.Tensor  # [G] density coordinate of each grid point
    values: list[float]  # [G] knob value of each grid point
    curves: dict[int, LayerCurves]
    layers: dict[int, LayerInputs]
    fingerprint: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return self.info.name

    def fisher_mean(self) -> float:
        """The mean Fisher diagonal `E[g_id²]` over every calibrated head: the scale of `damping`."""
        return float(torch.cat([c.grad_sq for c in self.curves.values()]).mean())

    def _stack(self, weights: tuple[float, float],
               damping: float = 0.0) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        ids = list(self.curves)
        lam = damping * self.fisher_mean() if damping else 0.0
        dens = torch.cat([self.curves[i].density.T for i in ids])  # [layers · Hq, G]
        cost = torch.cat([self.curves[i].cost(weights, lam).T for i in ids])
        return ids, dens, cost

    def sensitivity(self, density: float, weights: tuple[float, float] = (1.0, 1.0), damping: float = 0.0
                    ) -> dict[int, list[float]]:
        """Per layer, each head's HeSS score: its sensitivity-weighted error at the grid point whose
        mean density over all heads is nearest `density` (the reference budget of methods.md §4.2)."""
        ids, dens, cost = self._stack(weights, damping)
        g = int((dens.mean(0) - density).abs().argmin())
        hq = self.curves[ids[0]].density.shape[1]
        return {i: cost[n * hq:(n + 1) * hq, g].tolist() for n, i in enumerate(ids)}

    def _profile(self, values: dict[int, list[float]], name: str, meta: dict[str, Any]) -> Profile:
        layers = {i: {"method": self.method, "prefill_options": {**self.base, self.knob.option: v}}
                  for i, v in values.items()}
        k = self.knob
        full = {**self.meta, "method": self.method, "knob": k.option,
                "knob_range": {"low": k.low, "high": k.high, "denser": k.denser, "log": k.log},
                "options": dict(self.base), **meta}
        return Profile(name, dict(self.fingerprint), layers, full)

    def redistribute(self, density: float, weights: tuple[float, float] = (1.0, 1.0), scope: str = "model",
                     name: str = "", spread: int | None = None, damping: float = 0.0) -> Profile:
        """The HeSS profile: per head the grid value the allocation picks so that the average density
        (over every calibrated head, or per layer with `scope="layer"`) is `density` and the summed
        sensitivity-weighted error is least. `spread`: every head stays within that many grid steps of
        the grid point whose mean density is nearest `density` (None: anywhere on the grid) — a bound on
        how far the calibration prompts' sensitivities may move a head from the uniform setting.
        `damping` δ: the Gauss–Newton Hessian `g gᵀ` damped to `g gᵀ + λ I` with λ = δ × the mean Fisher
        diagonal (`fisher_mean`), which adds `½ λ Σ ‖e‖²` to every head's cost: δ = 0 is the plain Fisher;
        larger δ trusts the calibration prompts' few gradients less and weighs every head's raw output
        error more (δ = 1: a head of average gradient counts its output error as much as its Fisher term)."""
        if isinstance(damping, bool) or not isinstance(damping, int | float) or not damping >= 0:
            raise ValueError(f"damping is a multiple of the mean Fisher diagonal, >= 0; got {damping!r}")
        if spread is not None and (isinstance(spread, bool) or not isinstance(spread, int) or spread < 0):
            raise ValueError(f"spread is a number of grid steps >= 0 (or None), got {spread!r}")
        density = _check_density(density)
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
        if len(weights) != 2 or min(weights) < 0 or max(weights) <= 0:
            raise ValueError(f"weights are (output term, mass term), non-negative and not both 0; got {weights!r}")
        start = time.time()
        ids, dens, cost = self._stack(weights, damping)
        hq = self.curves[ids[0]].density.shape[1]
        lo = 0
        if spread is not None:  # the grid window around the uniform point
            g0 = int((dens.mean(0) - density).abs().argmin())
            lo, hi = max(0, g0 - spread), min(dens.shape[1], g0 + spread + 1)
            dens, cost = dens[:, lo:hi], cost[:, lo:hi]
        if scope == "model":
            pick = allocate(dens, cost, density)
        else:
            picks = []
            for n, i in enumerate(ids):
                try:
                    picks.append(allocate(dens[n * hq:(n + 1) * hq], cost[n * hq:(n + 1) * hq], density))
                except ValueError as e:
                    raise ValueError(f"layer {i}: {e}; scope='model' shares the budget across layers") from None
            pick = torch.cat(picks)
        rows = torch.arange(len(pick))
        got_d, got_c = dens[rows, pick], cost[rows, pick]
        pick = pick + lo
        values = {i: [self.values[int(g)] for g in pick[n * hq:(n + 1) * hq]] for n, i in enumerate(ids)}
        scores = self.sensitivity(density, weights, damping)
        flat = sorted(((s, i, h) for i, row in scores.items() for h, s in enumerate(row)), reverse=True)
        meta = {
            "mode": "hess", "target_density": density, "weights": list(weights), "scope": scope, "spread": spread,
            "damping": damping,
            "achieved": {"density": float(got_d.mean()), "predicted_cost": float(got_c.sum())},
            "per_layer": {str(i): {"density": got_d[n * hq:(n + 1) * hq].tolist(),
                                   "sensitivity": scores[i]} for n, i in enumerate(ids)},
            "sensitivity": {"per_layer_total": {str(i): sum(s) for i, s in scores.items()},
                            "top_heads": [[i, h, s] for s, i, h in flat[:10]]},
            "seconds": round(self.meta.get("seconds", 0.0) + time.time() - start, 1),
        }
        return self._profile(values, name or f"{self.method}-hess-d{density:g}", meta)

    def mean_density(self, t: float) -> float:
        """Mean density over every calibrated head and prompt with the knob at coordinate `t` everywhere."""
        value = float(self.knob.value(torch.tensor([float(t)], dtype=torch.float64)))
        options = {**self.base, self.knob.option: value}
        total, n = 0.0, 0
        for layer in self.layers.values():
            for i in range(len(layer.query)):
                total += float(kept_by(self.info, options, layer, i)[1].sum())
                n += layer.query[i].shape[1]
        return total / n

    def uniform(self, density: float, steps: int = 12, name: str = "") -> Profile:
        """The uniform baseline: one knob value for every head, bisected on the calibration prompts so the
        mean density is `density` (assumes density rises with the knob's density coordinate)."""
        density = _check_density(density)
        start = time.time()
        lo, hi = 0.0, 1.0
        d_lo, d_hi = self.mean_density(lo), self.mean_density(hi)
        if not d_lo - 1e-9 <= density <= d_hi + 1e-9:
            raise ValueError(f"average density {density:g} is outside what one {self.knob.option} for every head "
                             f"reaches on the calibration prompts: {d_lo:.4f} to {d_hi:.4f}")
        for _ in range(steps):
            mid = (lo + hi) / 2
            d_mid = self.mean_density(mid)
            if d_mid < density:
                lo, d_lo = mid, d_mid
            else:
                hi, d_hi = mid, d_mid
        t, got = (lo, d_lo) if abs(d_lo - density) < abs(d_hi - density) else (hi, d_hi)
        value = float(self.knob.value(torch.tensor([t], dtype=torch.float64)))
        hq = next(iter(self.layers.values())).query[0].shape[1]
        values = {i: [value] * hq for i in self.layers}
        meta = {"mode": "uniform", "target_density": density, "value": value, "t": t,
                "achieved": {"density": got, "predicted_cost": self._uniform_cost(t)},
                "seconds": round(self.meta.get("seconds", 0.0) + time.time() - start, 1)}
        return self._profile(values, name or f"{self.method}-uniform-d{density:g}", meta)

    def _uniform_cost(self, t: float, weights: tuple[float, float] = (1.0, 1.0)) -> float:
        """Summed sensitivity-weighted error at coordinate t, linear between grid points (a prediction)."""
        _, _, cost = self._stack(weights)
        grid = self.t.double()
        j = int(torch.searchsorted(grid, torch.tensor([t], dtype=torch.float64)).clamp(1, len(grid) - 1))
        w = (t - float(grid[j - 1])) / max(float(grid[j] - grid[j - 1]), 1e-12)
        return float(((1 - w) * cost[:, j - 1] + w * cost[:, j]).sum())


def hess_measure(model, tokenizer, method: str, *, data: str = "text", samples: int = 2,
                 lengths: Sequence[int] = (4096,), options: Mapping[str, Any] | None = None, grid: int = 12,
                 form: str = "fisher", checkpointing: bool | None = None, progress: bool = True) -> HessCalibration:
    """Record Q/K/V and attention-output gradients on `samples` prompts per length from `data` (as
    `calibrate`), then evaluate every head at `grid` knob values evenly spaced in the knob's density
    coordinate. `checkpointing` (default: when the model supports it) bounds the backward pass's
    memory to about one decoder layer's activations."""
    info, knob = _knob(method)
    if grid < 2:
        raise ValueError(f"grid must hold at least 2 knob values, got {grid}")
    if form not in FORMS:
        raise ValueError(f"form must be one of {', '.join(FORMS)}, got {form!r}")
    base = {k: info.spec(k).parse(v, f"prefill method {method!r}") for k, v in (options or {}).items()}
    if knob.option in base:
        raise ValueError(f"options fix {knob.option!r}, the option HeSS redistributes; leave it out")
    if checkpointing is None:
        checkpointing = bool(getattr(model, "supports_gradient_checkpointing", False))
    start = time.time()
    prompts = [x for n in lengths for x in calibration_samples(tokenizer, data, samples, int(n))]
    layers, grads, losses = record_with_grads(model, [x.ids for x in prompts], checkpointing=checkpointing,
                                              loss_from=[x.loss_from for x in prompts])
    t = torch.linspace(0, 1, grid, dtype=torch.float64)
    values = knob.value(t).tolist()
    settings = [{**base, knob.option: v} for v in values]
    curves = {}
    for i, layer in tqdm(layers.items(), desc=f"HeSS {method}", disable=not progress):
        curves[i] = layer_curves(info, layer, grads[i], settings, form, varied=knob.option)
        del grads[i][:]
    meta = {"form": form, "data": data, "samples": samples, "lengths": [int(x) for x in lengths],
            "loss_on": "answers" if any(x.loss_from for x in prompts) else "every token",
            "grid": {"t": t.tolist(), "values": values}, "loss": sum(losses) / len(losses),
            "seconds": round(time.time() - start, 1), "device": str(model.device), "dtype": str(model.dtype),
            "machine": platform.processor() or platform.machine(), "torch": torch.__version__}
    return HessCalibration(info, knob, base, t, values, curves, layers, model_fingerprint(model), meta)


def hess(model, tokenizer, method: str, density: float, *, weights: tuple[float, float] = (1.0, 1.0),
         scope: str = "model", name: str = "", spread: int | None = None, damping: float = 0.0,
         **measure: Any) -> Profile:
    """A HeSS profile for `method` at average `density` (see the module docstring); `measure`:
    `hess_measure`'s keywords (data, samples, lengths, options, grid, form, checkpointing, progress)."""
    _check_density(density)
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    return hess_measure(model, tokenizer, method, **measure).redistribute(
        density, weights, scope, name, spread, damping)
