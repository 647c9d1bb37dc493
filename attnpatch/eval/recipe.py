"""Recipes: a YAML file that names a model, a patch, the evaluation and where its report goes;
`attnpatch run recipes/NAME.yaml` loads the model, patches it, runs the offline suite and writes the
result JSON files and a report.

```yaml
name: smollm2-xattention-err0.05          # optional; default: the file's stem
description: XAttention with SmolLM2's calibrated per-head thresholds
model: smollm2                            # smollm2, gemma3-270m, a local HF directory, or tiny:FAMILY
dtype: float32                            # optional; default float32 on CPU, bfloat16 on GPU
patch:                                    # a PatchSpec mapping (the same parser as Python, CLI, lm-eval)
  method: xattention
  profile: ../calibration/smollm2-xattention-err0.05.json   # relative to this file
  backend: auto
eval:
  tasks: [passkey, perplexity]
  lengths: [4096]
  limit: 4
  baseline: true                          # also run dense on the same model and prompts
out: runs/smollm2-xattention-err0.05      # relative to the working directory
```

Loaded with `yaml.safe_load`; every level refuses unknown keys, naming the allowed ones (the patch
mapping through `PatchSpec.parse`). A profile path is relative to the recipe's folder; `out` to the
working directory.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnpatch.spec import PatchSpec

RECIPE_KEYS = ("name", "description", "model", "dtype", "device", "patch", "eval", "out")
EVAL_KEYS = ("tasks", "lengths", "limit", "max_gen_toks", "baseline", "fidelity")


@dataclass
class Recipe:
    """A parsed recipe: the model to load, the patch, the evaluation grid and the output folder."""

    name: str
    model: str
    spec: PatchSpec
    tasks: list[str]
    lengths: list[int]
    limit: int = 4
    out: Path = Path("runs")
    description: str = ""
    dtype: str | None = None
    device: str | None = None
    max_gen_toks: int | None = None
    baseline: bool = True
    fidelity: bool = True
    source: dict[str, Any] = field(default_factory=dict)


def _check_keys(where: str, doc: Any, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> None:
    if not isinstance(doc, Mapping):
        raise ValueError(f"{where} must be a mapping with keys {', '.join(allowed)}; got {type(doc).__name__}")
    unknown = sorted(str(k) for k in set(doc) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {', '.join(allowed)}")
    missing = [k for k in required if k not in doc]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}")


def _positive_int(where: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where} must be a positive integer, got {value!r}")
    return value


def _flag(where: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{where} must be true or false, got {value!r}")
    return value


def _text(where: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where} must be a non-empty string, got {value!r}")
    return value


def _list(value: Any) -> list:
    return [value] if isinstance(value, str | int) else list(value) if isinstance(value, list | tuple) else [value]


def parse_recipe(doc: Any, base_dir: str | Path = ".", default_name: str = "recipe") -> Recipe:
    """A Recipe from a YAML mapping; `base_dir` anchors a relative profile path."""
    from attnpatch.eval.suite import TASKS

    where = f"recipe {default_name!r}"
    _check_keys(where, doc, RECIPE_KEYS, required=("model", "patch", "eval"))
    name = _text(f"{where}: name", doc.get("name", default_name))
    patch = doc["patch"]
    if isinstance(patch, str):
        patch = {"method": patch}
    _check_keys(f"{where}: patch", patch, tuple(_spec_keys()))
    patch = dict(patch)
    profile = patch.get("profile")
    if isinstance(profile, str) and not Path(profile).is_absolute():
        patch["profile"] = str(Path(base_dir) / profile)
    try:
        spec = PatchSpec.parse(patch)
    except (ValueError, FileNotFoundError) as e:
        raise type(e)(f"{where}: patch: {e}") from None
    ev = doc["eval"]
    _check_keys(f"{where}: eval", ev, EVAL_KEYS, required=("tasks", "lengths"))
    tasks = [_text(f"{where}: eval.tasks", t) for t in _list(ev["tasks"])]
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise ValueError(f"{where}: eval.tasks: unknown task(s) {bad}; allowed: {', '.join(TASKS)}")
    lengths = [_positive_int(f"{where}: eval.lengths", n) for n in _list(ev["lengths"])]
    if not lengths:
        raise ValueError(f"{where}: eval.lengths must list at least one length")
    gen = ev.get("max_gen_toks")
    dtype = doc.get("dtype")
    if dtype is not None and dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"{where}: dtype must be one of float32, bfloat16, float16, got {dtype!r}")
    return Recipe(
        name=name, model=_text(f"{where}: model", doc["model"]), spec=spec, tasks=tasks, lengths=lengths,
        limit=_positive_int(f"{where}: eval.limit", ev.get("limit", 4)),
        out=Path(_text(f"{where}: out", doc.get("out", f"runs/{name}"))),
        description=str(doc.get("description", "")), dtype=dtype,
        device=None if doc.get("device") is None else _text(f"{where}: device", doc["device"]),
        max_gen_toks=None if gen is None else _positive_int(f"{where}: eval.max_gen_toks", gen),
        baseline=_flag(f"{where}: eval.baseline", ev.get("baseline", True)),
        fidelity=_flag(f"{where}: eval.fidelity", ev.get("fidelity", True)),
        source=dict(doc),
    )


def _spec_keys() -> tuple[str, ...]:
    from attnpatch.spec import SPEC_KEYS

    return SPEC_KEYS


def load_recipe(path: str | Path) -> Recipe:
    """Parse a recipe YAML file (`yaml.safe_load`)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe file {path} does not exist")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"recipe {path} is not valid YAML: {e}") from None
    return parse_recipe(doc, path.parent, path.stem)


def run_recipe(recipe: Recipe, out: str | Path | None = None, limit: int | None = None) -> Path:
    """Load the model, run the recipe's patch (and dense, with `baseline`) at every length over its
    tasks, write one JSON per run, `recipe.json` and `report.md` (+ PNG) into `out`; returns the report."""
    from attnpatch.eval.report import write_report
    from attnpatch.eval.suite import RunSpec, run_one
    from attnpatch.models import load, resolve

    out = Path(out) if out is not None else recipe.out
    limit = recipe.limit if limit is None else _positive_int("limit", limit)
    model, tok = load(recipe.model, dtype=recipe.dtype, device=recipe.device)
    out.mkdir(parents=True, exist_ok=True)
    specs = ([PatchSpec()] if recipe.baseline and not recipe.spec.is_dense else []) + [recipe.spec]
    for spec in specs:
        for length in recipe.lengths:
            run = RunSpec(spec, length)
            result = run_one(model, tok, run, recipe.tasks, limit, recipe.model, resolve(recipe.model),
                             measure_fidelity=recipe.fidelity, max_gen_toks=recipe.max_gen_toks)
            result["recipe"] = recipe.name
            (out / f"{run.name}.json").write_text(json.dumps(result, indent=1))
    (out / "recipe.json").write_text(json.dumps({"name": recipe.name, "description": recipe.description,
                                                 "recipe": recipe.source, "spec": recipe.spec.to_dict(),
                                                 "limit": limit}, indent=1, default=str))
    return write_report(out, out / "report.md")
