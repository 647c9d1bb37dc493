"""Calibrate every calibratable method for the shipped checkpoints and write the shipped profiles.

    python bench/scripts/make_profiles.py                      # smollm2 (4K) and gemma3-270m (16K), error 0.05

For each model and method (`attnpatch.calibrate.run.calibratable_methods()`; blasst is the per-phase
λ = a / L fit): `calibrate(...)` on `--data` (default `mixed`: Austen novels the suite does not use,
alternated with passkey prompts of seeds the suite does not use; the first profiles used `text` only),
then on held-out prompts (two passkey prompts of the suite's fidelity seeds 7 / 8 and a Pride and
Prejudice window: neither the calibration texts nor its seeds) the achieved mean output error and
density per head — measured exactly as calibration measures them (`calibrate.search.evaluate`;
blasst: `blasst_fit.measure_at`, prefill and decode) — for the profile and for the method's default
options. Writes calibration/<model>-<method>-<target>.json, recipes/<same>.yaml (one recipe per
profile), bench/results/calibration/profiles_<model>.json and calibration/README.md's table (built
from every profile in the folder). A method that does not apply to a model is listed with the reason.

Smoke run on a CPU (tiny random model; writes nothing under the repository):
    python bench/scripts/make_profiles.py --models tiny:llama --length 128 --methods xattention,blasst \
        --samples 1 --steps 2 --heldout-length 128 --root /tmp/make-profiles
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from attnpatch.calibrate import calibrate
from attnpatch.calibrate.blasst_fit import measure_at
from attnpatch.calibrate.record import record_layers
from attnpatch.calibrate.run import calibratable_methods
from attnpatch.calibrate.search import dense_outputs, evaluate
from attnpatch.calibrate.target import Target
from attnpatch.models import load
from attnpatch.profile import Profile
from attnpatch.registry import get_method

LENGTHS = {"smollm2": 4096, "gemma3-270m": 16384}
REPO = Path(__file__).resolve().parents[2]


def heldout_prompts(tok, length: int) -> list[torch.Tensor]:
    from attnpatch.eval.passkey import passkey_sample
    from attnpatch.eval.texts import austen

    out = [tok(passkey_sample(tok, target_tokens=length, seed=s).prompt, return_tensors="pt").input_ids[:, -length:]
           for s in (7, 8)]
    text = tok(austen(), return_tensors="pt", add_special_tokens=False).input_ids
    return out + [text[:, :length]]


def _mean(values: list[torch.Tensor]) -> float:
    return float(torch.cat([v.flatten() for v in values]).mean())


def measure_heldout(model, tok, method: str, profile: Profile, length: int) -> dict:
    """Mean output error and density per head on the held-out prompts: the profile and the defaults."""
    layers = record_layers(model, heldout_prompts(tok, length))
    base = dict(profile.meta.get("options", {}))
    if method == "blasst":
        block = int(base.get("block_size", 128))
        entry = profile.layers[min(profile.layers)]
        defaults = {"prefill": get_method("blasst", "prefill").spec("a").default,
                    "decode": get_method("blasst", "decode").spec("a").default}
        out = {}
        for tag, a in (("profile", {"prefill": entry["prefill_options"]["a"], "decode": entry["decode_options"]["a"]}),
                       ("defaults", defaults)):
            pre, dec = (measure_at(layers, a["prefill"], "prefill", block),
                        measure_at(layers, a["decode"], "decode", block))
            out[tag] = {"error": pre["error"], "density": 1 - pre["skipped"], "decode_error": dec["error"],
                        "decode_density": 1 - dec["skipped"], "a": a}
        return out
    info = get_method(method, "prefill")
    errs = {"profile": [], "defaults": []}
    dens = {"profile": [], "defaults": []}
    for i, layer in layers.items():
        dense, partials = dense_outputs(layer), {}
        for tag, options in (("profile", profile.layers[i]["prefill_options"]), ("defaults", base)):
            e, d = evaluate(info, options, layer, dense, partials=partials)
            errs[tag].append(e)
            dens[tag].append(d)
        del layer.query[:], layer.key[:], layer.value[:]
    return {tag: {"error": _mean(errs[tag]), "density": _mean(dens[tag])} for tag in errs}


def recipe_text(model: str, method: str, stem: str, profile_rel: str, length: int) -> str:
    return (f"# {model} with {method} calibrated by bench/scripts/make_profiles.py ({profile_rel}; see\n"
            f"# calibration/README.md). `attnpatch run recipes/{stem}.yaml`\n"
            f"description: {method} with the calibrated profile {stem} on {model}\n"
            f"model: {model}\n"
            f"patch:\n  method: {method}\n  profile: {profile_rel}\n"
            f"eval:\n  tasks: [passkey, perplexity, niah_single_1]\n  lengths: [{length}]\n  limit: 4\n"
            f"  baseline: true\nout: runs/{stem}\n")


def _row(path: Path, p: Profile) -> str:
    m = p.meta
    held = m.get("heldout") or {}
    prof, dflt = held.get("profile", {}), held.get("defaults", {})

    def pair(d: dict) -> str:
        if not d:
            return "-"
        text = f"{d['error']:.3f} / {d['density']:.3f}"
        if "decode_density" in d:
            text += f"; decode {d['decode_error']:.3f} / {d['decode_density']:.3f}"
        return text

    target = m.get("target") or {"kind": "error", "value": m.get("target_error")}
    ach = m.get("achieved", {})
    return (f"| `{path.name}` | {m.get('model', (p.fingerprint or {}).get('model_name', '?'))} | `{m.get('method')}`, "
            f"`{m.get('knob')}` | {target['kind']} {target['value']} | {ach.get('error', float('nan')):.3f} / "
            f"{ach.get('density', float('nan')):.3f} | {pair(prof)} | {pair(dflt)} | {m.get('seconds')} s, "
            f"{m.get('machine', '?')} | `{m.get('command', '')}` |")


def write_readme(folder: Path, readme: Path) -> None:
    rows = [_row(path, Profile.load(path)) for path in sorted(folder.glob("*.json"))]
    head = (
        "# Calibrated profiles\n\n"
        "Made by `python bench/scripts/make_profiles.py` (one `attnpatch calibrate` per row; the command is in each\n"
        "profile's `meta.command`), each keyed to its checkpoint's architecture and weights. Use:\n"
        "`patch_model(model, METHOD, profile=\"calibration/<file>\")` or `attnpatch run recipes/<file stem>.yaml`;\n"
        "`profile_shift=±x` moves a knob profile denser / sparser, `profile_sparsity=S` picks BLASST's a(S).\n\n"
        "Error / density: mean relative attention-output error and mean density (kept share of the causal\n"
        "blocks; BLASST: 1 − skipped share) per head. Held out: passkey prompts of seeds 7 and 8 and a Pride and\n"
        "Prejudice window (neither the calibration texts nor their seeds), at the calibration length.\n\n"
        "| file | model | method, knob | target | calibration prompts: error / density | held out, profile | "
        "held out, method defaults | time, machine | command |\n|---|---|---|---|---|---|---|---|---|\n")
    kept = ""
    if readme.exists():  # sections after the generated table (e.g. HeSS) are kept as they are
        text = readme.read_text()
        kept = text[text.index(TABLE_END):] if TABLE_END in text else ""
    readme.write_text(head + "\n".join(rows) + "\n\n" + (kept or TABLE_END + "\n"))


TABLE_END = "<!-- end of the generated table: what follows is kept by make_profiles.py -->"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="smollm2,gemma3-270m", help="comma separated (tiny:FAMILY for a smoke run)")
    p.add_argument("--methods", default="all", help="comma separated calibratable methods, or all")
    p.add_argument("--target", default="error=0.05", help="error=X, density=X or accuracy=X")
    p.add_argument("--length", type=int, default=None, help="calibration length (default: 4096 smollm2, 16384 gemma)")
    p.add_argument("--heldout-length", type=int, default=None, help="held-out prompt length (default: --length)")
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--data", default="mixed", help="calibration data: text, passkey, mixed (default) or a JSONL file")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--lambda-fit", default="geomean", choices=("geomean", "every"),
                   help="blasst: how the prompts' best λ·L combine (attnpatch calibrate --lambda-fit)")
    p.add_argument("--root", default=str(REPO), help="where calibration/, recipes/ and bench/results/ are written")
    args = p.parse_args(argv)
    target = Target.parse(args.target)
    methods = calibratable_methods() if args.methods == "all" else [m.strip() for m in args.methods.split(",")]
    bad = sorted(set(methods) - set(calibratable_methods()))
    if bad:
        raise SystemExit(f"not calibratable: {bad}; calibratable: {', '.join(calibratable_methods())}")
    root = Path(args.root)
    folder, recipes, results = root / "calibration", root / "recipes", root / "bench" / "results" / "calibration"
    for d in (folder, recipes, results):
        d.mkdir(parents=True, exist_ok=True)
    for name in [m.strip() for m in args.models.split(",")]:
        length = args.length or LENGTHS.get(name, 4096)
        held_length = args.heldout_length or length
        model, tok = load(name)
        short = name.replace(":", "-")
        summary_path = results / f"profiles_{short}.json"
        earlier = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        summary = {"model": name, "length": length, "target": args.target, "device": str(model.device),
                   "dtype": str(model.dtype), "torch": torch.__version__, "python": platform.python_version(),
                   "command": "python bench/scripts/make_profiles.py " + " ".join(argv or sys.argv[1:]),
                   # methods this run did not calibrate keep their earlier entry (each says how it was made)
                   "methods": {m: e for m, e in earlier.get("methods", {}).items() if m not in methods}}
        for method in methods:
            stem = f"{short}-{method}-{target.label}"
            flag = {"error": "--target-error", "density": "--target-density",
                    "accuracy": "--accuracy-floor"}[target.kind]
            cmd = (f"attnpatch calibrate --model {name} --method {method} {flag} {target.value:g} --data {args.data} "
                   f"--samples {args.samples} --lengths {length} --steps {args.steps} --out calibration/{stem}.json")
            fit = args.lambda_fit if method == "blasst" else "geomean"
            if fit != "geomean":
                cmd = cmd.replace(" --out ", f" --lambda-fit {fit} --out ")
            try:
                profile = calibrate(model, tok, method, target=target, data=args.data, samples=args.samples,
                                    lengths=(length,), steps=args.steps, name=stem, lambda_fit=fit)
            except (ValueError, RuntimeError, NotImplementedError) as e:
                print(f"{name} {method}: skipped ({e})", flush=True)
                summary["methods"][method] = {"skipped": str(e)}
                continue
            profile.meta.update(model=name, command=cmd)
            start = time.time()
            profile.meta["heldout"] = measure_heldout(model, tok, method, profile, held_length)
            profile.meta["heldout"]["seconds"] = round(time.time() - start, 1)
            profile.save(folder / f"{stem}.json")
            (recipes / f"{stem}.yaml").write_text(recipe_text(name, method, stem, f"../calibration/{stem}.json",
                                                               held_length))
            summary["methods"][method] = {"file": f"calibration/{stem}.json", "command": cmd, "data": args.data,
                                          "seconds": profile.meta["seconds"],
                                          "achieved": profile.meta["achieved"], "heldout": profile.meta["heldout"],
                                          "machine": profile.meta["machine"]}
            print(f"{name} {method}: {profile.meta['seconds']} s; calibration {profile.meta['achieved']}; "
                  f"held out {profile.meta['heldout']}", flush=True)
        summary_path.write_text(json.dumps(summary, indent=1))
        del model
    write_readme(folder, folder / "README.md")
    print(f"wrote {folder / 'README.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
