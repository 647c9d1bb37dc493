"""HeSS-redistributed vs uniform per-head budgets at equal average density (issue 11, methods.md §4).

For each method: one HeSS measurement on calibration prompts (`--calib-data`: Austen novels the suite does
not use, or passkey prompts with their answers, `--calib-samples` of `--length` tokens), then two profiles
at the same average density `--density`:
HeSS (knob redistributed per head) and uniform (one knob value for every head, bisected to the same
density). Both are measured on held-out prompts: fidelity (attention recall, output relative error,
density; `attnpatch.eval.fidelity.measure`, reference backend) on `--samples` passkey prompts with seeds
2000+i, and passkey accuracy (the suite's passkey task, seeds 1000+i, `--samples` prompts) with the
patch's own prefill density over those tasks, and the perplexity of one Pride and Prejudice window
(the suite's task). Dense passkey accuracy and perplexity are the reference.

    python bench/scripts/hess_vs_uniform.py --model smollm2 --length 4096 --samples 2 \\
        --methods xattention flexprefill -o xattention.block_size=64 -o flexprefill.block_size=64 \\
        --out bench/results/calibration/hess_smollm2

Writes OUT/hess_vs_uniform.json, OUT/README.md (table + command) and OUT/profiles/*.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from attnpatch.calibrate.data import calibration_ids
from attnpatch.calibrate.hess import hess_measure
from attnpatch.eval.fidelity import measure
from attnpatch.eval.passkey import passkey_sample
from attnpatch.eval.suite import RunSpec, run_one
from attnpatch.models import load, resolve
from attnpatch.profile import Profile
from attnpatch.registry import get_method
from attnpatch.spec import PatchSpec

FIDELITY_SEED = 2000
CALIB_DATA = {"text": "text (Austen novels outside the eval suite; loss on every token)",
              "passkey": "passkey prompts (seeds 90000+i, never used by the suite; loss on the appended answer)"}
TASKS = ["passkey", "perplexity"]


def _options(items: list[str], methods: list[str]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {m: {} for m in methods}
    for item in items:
        key, _, value = item.partition("=")
        method, _, name = key.partition(".")
        if not value or not name or method not in out:
            raise SystemExit(f"-o takes METHOD.KEY=VALUE for one of {methods}, got {item!r}")
        out[method][name] = value
    return out


def _fidelity(model, tok, spec: PatchSpec, length: int, samples: int) -> dict:
    """Attention recall, output error and density of `spec`, averaged over `samples` passkey prompts
    (seeds 2000+i)."""
    fid = []
    for i in range(samples):
        text = passkey_sample(tok, target_tokens=length - 16, depth=(i + 0.5) / samples, seed=FIDELITY_SEED + i).prompt
        ids = tok(text, return_tensors="pt").input_ids[:, -length:]
        report, _ = measure(model, ids, spec)
        fid.append(report.summary())
    return {k: sum(f[k] for f in fid) / len(fid) for k in fid[0]}


def _heldout(model, tok, spec: PatchSpec, length: int, samples: int, model_name: str) -> dict:
    """`_fidelity`, passkey accuracy (seeds 1000+i) and the perplexity of one Pride and Prejudice window
    (the suite's tasks)."""
    out = _fidelity(model, tok, spec, length, samples)
    run = run_one(model, tok, RunSpec(spec, length), TASKS, samples, model_name, resolve(model_name),
                  measure_fidelity=False)
    out.update(run["scores"])
    out["prefill_density"] = run["density"]
    return out


def _first_value(profile: Profile) -> float:
    """The knob value of a uniform profile (every head has the same)."""
    name = profile.meta.get("knob")
    entry = profile.for_layer(min(profile.layers))
    holder = entry.get("prefill_options", entry)
    return float(holder[name][0])


def match_heldout(model, tok, method: str, uniform: Profile, target: float, length: int, samples: int,
                  tol: float = 0.002, steps: int = 7) -> tuple[Profile, list[tuple[float, float]]]:
    """The uniform profile moved along its knob (`Profile.adjusted(shift)`, the same shift for every head, so
    it stays uniform) until its held-out density is `target` (a HeSS profile's): the target bracketed from
    shift 0 outwards, then regula falsi (held-out density assumed to rise with the shift); at most `steps`
    densities measured, the nearest kept. Only densities are compared; accuracy plays no part."""
    tried: list[tuple[float, float]] = []

    knob = None if "knob_range" in uniform.meta else get_method(method, "prefill").cls.knob  # older profiles

    def moved(shift: float) -> Profile:
        return uniform.adjusted(shift=shift, knob=knob) if shift else uniform

    def density(shift: float) -> float:
        d = _fidelity(model, tok, PatchSpec.build(method, profile=moved(shift)), length, samples)["density"]
        tried.append((shift, d))
        print(f"  match {method}: shift {shift:+.4f} -> held-out density {d:.4f} (target {target:.4f})", flush=True)
        return d

    d0 = density(0.0)
    if abs(d0 - target) <= tol:
        return uniform, tried
    # bracket the target from shift 0 outwards (density rises with the shift), then regula falsi
    step = 0.02 if d0 < target else -0.02
    a, da = 0.0, d0
    b, db = step, density(step)
    while abs(db - target) > tol and (db - target) * (da - target) > 0 and abs(b) < 0.5 and len(tried) < steps:
        a, da, b = b, db, b * 2
        db = density(b)
    for _ in range(steps - len(tried)):
        if abs(db - target) <= tol or (db - target) * (da - target) > 0 or db == da:
            break
        mid = a + (target - da) * (b - a) / (db - da)
        dm = density(mid)
        if abs(dm - target) <= tol:
            break
        if (dm - target) * (da - target) < 0:
            b, db = mid, dm
        else:
            a, da = mid, dm
    best = min(tried, key=lambda t: abs(t[1] - target))[0]
    return moved(best), tried


def _kind(spread: str, damping: float, weights: tuple[float, float] = (1.0, 1.0)) -> str:
    """Profile label: `hess`, `hess-spread1`, `hess-spread1-damp0.5`, `hess-spread1-w0,1` (term weights)."""
    label = ("hess" if spread == "none" else f"hess-spread{spread}") + (f"-damp{damping:g}" if damping else "")
    return label + ("" if tuple(weights) == (1.0, 1.0) else f"-w{weights[0]:g},{weights[1]:g}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--samples", type=int, default=2, help="held-out prompts (fidelity and passkey each)")
    p.add_argument("--calib-samples", type=int, default=1, help="calibration prompts")
    p.add_argument("--calib-data", default="text",
                   help="calibration data: text (Austen, loss on every token), passkey (seeds the suite never "
                        "uses, loss on the answer) or a JSONL path (default: %(default)s)")
    p.add_argument("--methods", nargs="+", default=["xattention", "flexprefill"])
    p.add_argument("--density", type=float, default=0.35, help="average density of both profiles")
    p.add_argument("--grid", type=int, default=12, help="knob values per head for HeSS")
    p.add_argument("--form", default="fisher", choices=("fisher", "diagonal"))
    p.add_argument("-o", "--option", action="append", default=[], metavar="METHOD.KEY=VALUE")
    p.add_argument("--out", default="bench/results/calibration/hess_smollm2")
    p.add_argument("--spreads", nargs="+", default=["none"],
                   help="HeSS profiles to compare: grid steps each head may move from the uniform point "
                        "(`none`: anywhere); one 'hess' row per value (default: none)")
    p.add_argument("--dampings", nargs="+", type=float, default=[0.0],
                   help="Fisher dampings δ (multiples of its mean diagonal): one HeSS profile per spread and damping")
    p.add_argument("--weights", nargs=2, type=float, default=[1.0, 1.0], metavar=("OUTPUT", "MASS"),
                   help="weights of HeSS's two error terms (output error, dropped mass); 0 1: the mass term only")
    p.add_argument("--match-heldout", action="store_true",
                   help="also move the uniform profile (one shift of its knob for every head) until its held-out "
                        "density equals each HeSS profile's, and evaluate it: a comparison at equal held-out density")
    p.add_argument("--reuse", action="store_true",
                   help="evaluate the profiles already in OUT/profiles (from an earlier run) instead of calibrating")
    args = p.parse_args(argv)
    options = _options(args.option, args.methods)
    out_dir = Path(args.out)
    (out_dir / "profiles").mkdir(parents=True, exist_ok=True)
    start = time.time()
    model, tok = load(args.model)
    calibration_ids(tok, args.calib_data, args.calib_samples, args.length)  # fail early on data too short
    dense = run_one(model, tok, RunSpec(PatchSpec.build("dense"), args.length), TASKS, args.samples,
                    args.model, resolve(args.model), measure_fidelity=False)
    results: dict = {}
    for method in args.methods:
        weights = (float(args.weights[0]), float(args.weights[1]))
        spreads = {_kind(v, d, weights): (None if v == "none" else int(v), d)
                   for v in args.spreads for d in args.dampings}
        paths = {kind: out_dir / "profiles" / f"{method}-{kind}-d{args.density:g}.json"
                 for kind in (*spreads, "uniform")}
        if args.reuse and all(p.is_file() for p in paths.values()):
            profiles = {kind: Profile.load(path) for kind, path in paths.items()}
        else:
            cal = hess_measure(model, tok, method, data=args.calib_data, samples=args.calib_samples,
                               lengths=(args.length,), options=options[method], grid=args.grid, form=args.form)
            profiles = {kind: cal.redistribute(args.density, weights, spread=v, damping=d)
                        for kind, (v, d) in spreads.items()}
            profiles["uniform"] = cal.uniform(args.density)
            for kind, profile in profiles.items():
                profile.meta["command"] = "python bench/scripts/hess_vs_uniform.py " + " ".join(argv or sys.argv[1:])
                profile.save(paths[kind])
        row = {}
        for kind, profile in profiles.items():
            path = paths[kind]
            spec = PatchSpec.build(method, profile=profile)
            row[kind] = {"calibration": {**profile.meta["achieved"], "seconds": profile.meta["seconds"]},
                         "heldout": _heldout(model, tok, spec, args.length, args.samples, args.model),
                         "profile": str(path)}
            if kind == "uniform":
                row[kind]["value"] = profile.meta["value"]
            print(method, kind, json.dumps(row[kind]), flush=True)
        if args.match_heldout:
            for kind in [k for k in row if k != "uniform"]:
                target = row[kind]["heldout"]["density"]
                matched, tried = match_heldout(model, tok, method, profiles["uniform"], target, args.length,
                                               args.samples)
                spec = PatchSpec.build(method, profile=matched)
                name = f"uniform-matched-{kind}"
                row[name] = {"calibration": {**profiles["uniform"].meta["achieved"],
                                             "seconds": profiles["uniform"].meta["seconds"]},
                             "heldout": _heldout(model, tok, spec, args.length, args.samples, args.model),
                             "value": float(_first_value(matched)),
                             "shift": matched.meta.get("adjusted", {}).get("shift", 0.0),
                             "matched_to": kind, "tried": tried}
                print(method, name, json.dumps(row[name]), flush=True)
        results[method] = row
    data = {"what": "HeSS-redistributed vs uniform per-head budgets at equal average density",
            "command": "python bench/scripts/hess_vs_uniform.py " + " ".join(argv or sys.argv[1:]),
            "model": args.model, "length": args.length, "density": args.density, "form": args.form,
            "calibration": {"data": CALIB_DATA.get(args.calib_data, args.calib_data), "samples": args.calib_samples,
                            "grid": args.grid, "options": options},
            "heldout": {"samples": args.samples, "fidelity": f"passkey prompts, seeds {FIDELITY_SEED}+i",
                        "passkey": "suite passkey, seeds 1000+i"},
            "dense": dense["scores"], "methods": results,
            "seconds": round(time.time() - start, 1), "device": str(model.device), "dtype": str(model.dtype),
            "machine": platform.processor() or platform.machine(), "torch": torch.__version__}
    (out_dir / "hess_vs_uniform.json").write_text(json.dumps(data, indent=1))
    lines = [f"# HeSS vs uniform budgets — {args.model}, {args.length} tokens, average density {args.density}", "",
             f"Command: `{data['command']}`", "",
             f"Calibration: {args.calib_samples} prompt(s) of {CALIB_DATA.get(args.calib_data, args.calib_data)}, "
             f"grid {args.grid}, form {args.form}; held out: "
             f"{args.samples} passkey prompt(s) for fidelity (seeds {FIDELITY_SEED}+i) and {args.samples} for passkey "
             f"accuracy (seeds 1000+i), perplexity of one Pride and Prejudice window. Dense: passkey "
             f"{dense['scores']['passkey']:.2f}, perplexity {dense['scores']['perplexity']:.3f}. {data['device']}, "
             f"{data['dtype']}, {data['seconds']} s.", "",
             "| method | budgets | density (calib) | predicted ΔL (calib) | density (held out) | recall | output error "
             "| passkey | perplexity | prefill density (tasks) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for method, row in results.items():
        for kind, r in row.items():
            c, h = r["calibration"], r["heldout"]
            label = f"{kind} ({r['value']:.4g})" if kind.startswith("uniform") else kind
            lines.append(f"| {method} | {label} | {c['density']:.3f} | {c['predicted_cost']:.3g} | "
                         f"{h['density']:.3f} | {h['recall']:.4f} | {h['rel_error']:.4f} | {h['passkey']:.2f} | "
                         f"{h['perplexity']:.3f} | {h['prefill_density']:.3f} |")
    (out_dir / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
