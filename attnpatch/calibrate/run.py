"""`calibrate(model, tokenizer, method, ...)`: record real Q/K/V on a few prompts, search the method's
per-head knob against an output-error tolerance layer by layer, and return the result as a Profile."""

from __future__ import annotations

import platform
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from attnpatch.calibrate.data import calibration_ids
from attnpatch.calibrate.record import record_layers
from attnpatch.calibrate.search import search_layer
from attnpatch.profile import Profile
from attnpatch.registry import get_method, method_infos


def calibratable_methods() -> list[str]:
    """Prefill methods with a per-head knob that `calibrate` can search."""
    return [m.name for m in method_infos("prefill") if getattr(m.cls, "knob", None) is not None]


def calibrate(model, tokenizer, method: str, *, target_error: float = 0.05, data: str = "text", samples: int = 4,
              lengths: Sequence[int] = (4096,), options: Mapping[str, Any] | None = None, steps: int = 8,
              name: str = "", progress: bool = True) -> Profile:
    """A Profile with, per layer and query head, the sparsest value of `method`'s knob (e.g.
    xattention's `threshold`, sale's `tau`) whose mean relative attention-output error on the
    calibration prompts stays within `target_error`; `options` fixes the method's other options.

    data: "text" (Austen novels the evaluation suite does not use), "passkey" (prompts with seeds it
    does not use) or a JSONL file (`{"text": ...}` or `{"prompt": ...}` per line). One dense forward per
    prompt records every layer's Q/K/V; `steps` bisection steps per layer evaluate all heads at once.
    The profile's `meta` records the method, knob, target, data, achieved error and density per layer,
    and the time it took.
    """
    info = get_method(method, "prefill")
    knob = getattr(info.cls, "knob", None)
    if knob is None:
        raise ValueError(f"method {method!r} has no per-head knob to calibrate; calibratable: "
                         f"{', '.join(calibratable_methods())}")
    if not 0 < target_error < 1:
        raise ValueError(f"target_error must be in (0, 1) (a relative output error), got {target_error}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    base = {k: info.spec(k).parse(v, f"prefill method {method!r}") for k, v in (options or {}).items()}
    if knob.option in base:
        raise ValueError(f"options fix {knob.option!r}, the option calibration searches; leave it out")
    start = time.time()
    prompts = [ids for n in lengths for ids in calibration_ids(tokenizer, data, samples, int(n))]
    layers = record_layers(model, prompts)
    fits, profile_layers = {}, {}
    for i, layer in tqdm(layers.items(), desc=f"calibrate {method}", disable=not progress):
        fit = search_layer(info, knob, base, layer, target_error, steps)
        fits[i] = fit
        profile_layers[i] = {"method": method, "prefill_options": {**base, knob.option: fit.values}}
        del layer.query[:], layer.key[:], layer.value[:]
    n = max(1, sum(len(f.values) for f in fits.values()))
    meta = {
        "method": method, "knob": knob.option, "target_error": target_error, "data": data, "samples": samples,
        "lengths": [int(x) for x in lengths], "steps": steps, "options": dict(base),
        "achieved": {"error": sum(sum(f.error) for f in fits.values()) / n,
                     "density": sum(sum(f.density) for f in fits.values()) / n},
        "per_layer": {str(i): {"error": f.error, "density": f.density} for i, f in fits.items()},
        "seconds": round(time.time() - start, 1), "device": str(model.device), "dtype": str(model.dtype),
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
    }
    return Profile.for_model(model, profile_layers, name or f"{method}-err{target_error:g}", meta)
