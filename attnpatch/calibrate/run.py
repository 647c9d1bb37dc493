"""`calibrate(model, tokenizer, method, target=...)`: record real Q/K/V on a few prompts, fit the
method's per-head knob (or BLASST's λ = a / L per phase) to the target, and return a Profile.

Targets (`attnpatch.calibrate.target`):
* `error=X`: each head's sparsest knob value whose mean relative attention-output error is within X;
* `density=X`: each head's knob value whose mean density (kept share of its causal blocks) is nearest X
  (bisection to the density; BLASST: the `a` whose skipped share is 1 − X, per phase);
* `accuracy=F`: an outer bisection on the error tolerance (log scale, between 0.005 and 0.3): the
  loosest tolerance whose profile keeps a held-out passkey score (prompts of calibration seeds, at the
  longest calibration length) ≥ F × the dense model's score on the same prompts. Cost: one recording,
  then `accuracy_steps` (+1 when no step meets the floor) error-target fits and as many patched passkey
  runs of `accuracy_prompts` prompts, plus one dense passkey run — about `accuracy_steps + 1` times an
  error-target calibration.
"""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from attnpatch.calibrate.blasst_fit import LAMBDA_FITS
from attnpatch.calibrate.data import calibration_ids
from attnpatch.calibrate.record import LayerInputs, record_layers
from attnpatch.calibrate.search import search_layer
from attnpatch.calibrate.target import Target, resolve_target
from attnpatch.profile import Profile, architecture
from attnpatch.registry import get_method, method_infos

ACCURACY_RANGE = (0.005, 0.3)  # error tolerances the accuracy-floor search moves between
LAMBDA_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3)  # BLASST λ grid (λ = a / L)

Fitter = Callable[[Target, bool], tuple[dict[int, dict], dict[str, Any]]]


def calibratable_methods() -> list[str]:
    """Prefill methods with a per-head knob that `calibrate` can search."""
    return [m.name for m in method_infos("prefill") if getattr(m.cls, "knob", None) is not None]


def _knob_fitter(method: str, base: dict, layers: dict[int, LayerInputs], steps: int, progress: bool) -> Fitter:
    info = get_method(method, "prefill")
    knob = info.cls.knob

    def fit(target: Target, free: bool):
        fits, out = {}, {}
        tol, den = (target.value, None) if target.kind == "error" else (None, target.value)
        for i, layer in tqdm(layers.items(), desc=f"calibrate {method} {target.label}", disable=not progress):
            f = search_layer(info, knob, base, layer, tol, steps, density=den)
            fits[i] = f
            out[i] = {"method": method, "prefill_options": {**base, knob.option: f.values, **f.extra}}
            if free:
                del layer.query[:], layer.key[:], layer.value[:]
        n = max(1, sum(len(f.values) for f in fits.values()))
        meta = {"achieved": {"error": sum(sum(f.error) for f in fits.values()) / n,
                             "density": sum(sum(f.density) for f in fits.values()) / n},
                "per_layer": {str(i): {"error": f.error, "density": f.density} for i, f in fits.items()}}
        return out, meta

    return fit


def _blasst_fitter(model, base: dict, layers: dict[int, LayerInputs], grid: Sequence[float],
                   decode_steps: int, progress: bool, rule: str = "geomean") -> Fitter:
    """BLASST: one a per phase (λ = a / L over prompts and lengths, combined by `rule`: `fit_table`), in
    every layer, and the a(S) tables; the λ tables are measured once and serve every target."""
    from attnpatch.calibrate.blasst_fit import a_of_s, fit_table, lambda_table, measure_at

    block = int(base.get("block_size", 128))
    tables = {phase: lambda_table(layers, grid, phase, block, decode_steps)
              for phase in tqdm(("prefill", "decode"), desc="blasst λ grid", disable=not progress)}
    n_layers = architecture(model.config)["num_hidden_layers"]
    convention = base.get("convention")

    def fit(target: Target, free: bool):
        per_phase = {}
        for phase, table in tables.items():
            kw = ({"tolerance": target.value, "rule": rule} if target.kind == "error"
                  else {"target_skipped": 1 - target.value})
            a, points = fit_table(table, **kw)
            per_phase[phase] = {"a": a, "points": points, **measure_at(layers, a, phase, block, decode_steps)}
        dec = {"a": per_phase["decode"]["a"], "page_size": block}
        if convention is not None:
            dec["convention"] = convention
        out = {i: {"method": "blasst", "prefill_options": {**base, "a": per_phase["prefill"]["a"]},
                   "decode": "blasst", "decode_options": dict(dec)} for i in range(n_layers)}
        pre = per_phase["prefill"]
        meta = {"achieved": {"error": pre["error"], "density": 1 - pre["skipped"],
                             "decode_error": per_phase["decode"]["error"],
                             "decode_density": 1 - per_phase["decode"]["skipped"]},
                "fit": per_phase, "grid": list(grid), "decode_steps": decode_steps, "lambda_fit": rule,
                "a_of_s": {phase: a_of_s(table) for phase, table in tables.items()}}
        if free:
            for layer in layers.values():
                del layer.query[:], layer.key[:], layer.value[:]
        return out, meta

    return fit


def _accuracy_loop(fit: Fitter, model, tokenizer, method: str, floor: float, length: int, prompts: int,
                   steps: int, progress: bool) -> tuple[dict[int, dict], dict[str, Any]]:
    from attnpatch.calibrate.accuracy import passkey_score
    from attnpatch.spec import PatchSpec

    dense = passkey_score(model, tokenizer, None, length, prompts)
    need = floor * dense
    lo, hi = math.log(ACCURACY_RANGE[0]), math.log(ACCURACY_RANGE[1])
    tried, best = [], None
    for _ in tqdm(range(steps), desc=f"accuracy floor {floor:g}", disable=not progress):
        tol = math.exp((lo + hi) / 2)
        layers, meta = fit(Target("error", tol), False)
        score = passkey_score(model, tokenizer, PatchSpec.build(method, profile=Profile("trial", None, layers)),
                              length, prompts)
        tried.append({"tolerance": tol, "score": score, "density": meta["achieved"]["density"]})
        if score >= need:
            lo, best = math.log(tol), (tol, layers, meta, score)
        else:
            hi = math.log(tol)
    if best is None:  # no tried tolerance kept the floor: the tightest one
        tol = ACCURACY_RANGE[0]
        layers, meta = fit(Target("error", tol), False)
        score = passkey_score(model, tokenizer, PatchSpec.build(method, profile=Profile("trial", None, layers)),
                              length, prompts)
        tried.append({"tolerance": tol, "score": score, "density": meta["achieved"]["density"]})
        best = (tol, layers, meta, score)
    tol, layers, meta, score = best
    meta["accuracy"] = {"task": "passkey", "prompts": prompts, "length": length, "dense_score": dense,
                        "score": score, "floor": floor, "met": score >= need, "tolerance": tol, "tried": tried}
    return layers, meta


def calibrate(model, tokenizer, method: str, *, target: Any = None, target_error: float | None = None,
              data: str = "text", samples: int = 4, lengths: Sequence[int] = (4096,),
              options: Mapping[str, Any] | None = None, steps: int = 8, name: str = "", progress: bool = True,
              accuracy_prompts: int = 4, accuracy_steps: int = 4, lambda_grid: Sequence[float] = LAMBDA_GRID,
              decode_steps: int = 16, lambda_fit: str = "geomean") -> Profile:
    """A Profile of `method` for this checkpoint meeting `target` (see the module docstring):
    "error=0.05" (default), "density=0.3", "accuracy=0.9", a `Target`, or a float (an error tolerance);
    `target_error=` is the older spelling of an error target. `options` fixes the method's other options.

    Knob methods (e.g. xattention's `threshold`, sale's `tau`) get one value per layer and query head
    (`steps` bisection steps per layer, all heads at once). `blasst` gets λ = a / L fitted per phase
    (prefill key tiles; decode pages over the prompts' last `decode_steps` positions) on `lambda_grid`,
    the same `a` in every layer, and a(S) tables for `profile_sparsity`; `lambda_fit` = "geomean" (a typical
    prompt within an error target) or "every" (each calibration prompt within it: `blasst_fit.fit_table`).

    data: "text" (Austen novels the evaluation suite does not use), "passkey" (prompts with seeds it
    does not use) or a JSONL file (`{"text": ...}` or `{"prompt": ...}` per line); one dense forward per
    prompt records every layer's Q/K/V. The profile's `meta` records the method, knob, target, data,
    achieved error and density (per layer for knob methods), and the time and machine it took.
    """
    info = get_method(method, "prefill")
    knob = getattr(info.cls, "knob", None)
    if knob is None:
        raise ValueError(f"method {method!r} has no per-head knob to calibrate; calibratable: "
                         f"{', '.join(calibratable_methods())}")
    goal = resolve_target(target, target_error)
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if goal.kind == "accuracy" and (accuracy_prompts < 1 or accuracy_steps < 1):
        raise ValueError(f"accuracy_prompts and accuracy_steps must be at least 1, got {accuracy_prompts}, "
                         f"{accuracy_steps}")
    if lambda_fit not in LAMBDA_FITS:
        raise ValueError(f"lambda_fit must be one of {', '.join(LAMBDA_FITS)}, got {lambda_fit!r}")
    if lambda_fit != LAMBDA_FITS[0] and method != "blasst":
        raise ValueError(f"lambda_fit applies to blasst's λ = a / L fit only, not to {method!r}")
    if not lengths or any(int(n) < 1 for n in lengths):
        raise ValueError(f"lengths must be positive integers, got {list(lengths)}")
    base = {k: info.spec(k).parse(v, f"prefill method {method!r}") for k, v in (options or {}).items()}
    if knob.option in base:
        raise ValueError(f"options fix {knob.option!r}, the option calibration searches; leave it out")
    start = time.time()
    prompts = [ids for n in lengths for ids in calibration_ids(tokenizer, data, samples, int(n))]
    layers = record_layers(model, prompts)
    if method == "blasst":
        fit = _blasst_fitter(model, base, layers, lambda_grid, decode_steps, progress, lambda_fit)
    else:
        fit = _knob_fitter(method, base, layers, steps, progress)
    if goal.kind == "accuracy":
        profile_layers, found = _accuracy_loop(fit, model, tokenizer, method, goal.value, max(int(n) for n in lengths),
                                               accuracy_prompts, accuracy_steps, progress)
    else:
        profile_layers, found = fit(goal, True)
    meta = {
        "method": method, "knob": knob.option,
        "knob_range": {"low": knob.low, "high": knob.high, "denser": knob.denser, "log": knob.log},
        "target": {"kind": goal.kind, "value": goal.value}, "data": data, "samples": samples,
        "lengths": [int(x) for x in lengths], "steps": steps, "options": dict(base), **found,
        "seconds": round(time.time() - start, 1), "device": str(model.device), "dtype": str(model.dtype),
        "machine": _machine(model), "torch": torch.__version__,
    }
    if goal.kind == "error":
        meta["target_error"] = goal.value
    return Profile.for_model(model, profile_layers, name or f"{method}-{goal.label}", meta)


def _machine(model) -> str:
    if model.device.type == "cuda":
        return torch.cuda.get_device_name(model.device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
