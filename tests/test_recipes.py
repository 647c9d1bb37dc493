"""Recipes: every shipped recipe parses into a PatchSpec, every shipped profile has one, unknown keys are
refused at every level naming the allowed ones, and a tiny-model recipe runs end to end."""

import json
from pathlib import Path

import pytest
import yaml

from attnpatch.cli import main
from attnpatch.eval.recipe import EVAL_KEYS, RECIPE_KEYS, load_recipe, parse_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_parses(path):
    recipe = load_recipe(path)
    assert recipe.tasks and recipe.lengths and recipe.limit >= 1
    doc = yaml.safe_load(path.read_text())
    assert recipe.spec.method == doc["patch"]["method"].partition(":")[0]


def test_every_shipped_profile_has_a_recipe_and_the_quickstart_is_one():
    named = {Path(yaml.safe_load(p.read_text())["patch"].get("profile", "")).name for p in RECIPES}
    for profile in (ROOT / "calibration").glob("*.json"):
        assert profile.name in named, f"no recipe in recipes/ uses {profile.name}"
    quick = load_recipe(ROOT / "recipes" / "quickstart.yaml")
    assert (quick.model, quick.spec.method, quick.spec.decode) == ("smollm2", "proxyattn", "streaming")


BASE = {"model": "tiny:llama", "patch": {"method": "a_shape"}, "eval": {"tasks": ["passkey"], "lengths": [128]}}


@pytest.mark.parametrize(("change", "message"), [
    ({"modle": "x"}, f"unknown key(s) ['modle']; allowed: {', '.join(RECIPE_KEYS)}"),
    ({"eval": {"tasks": ["passkey"], "lengths": [128], "limits": 2}},
     f"eval: unknown key(s) ['limits']; allowed: {', '.join(EVAL_KEYS)}"),
    ({"patch": {"method": "a_shape", "decod": "streaming"}}, "patch: unknown key(s) ['decod']; allowed: method"),
    ({"patch": {"method": "a_shape", "decode": {"name": "streaming", "opts": {}}}},
     "needs 'name' and may have 'options'"),
    ({"patch": {"method": "a_shape", "options": {"windw": 3}}}, "unknown option 'windw'"),
    ({"patch": {"method": "a_shape", "profile_shift": 0.1}}, "give profile= too"),
    ({"eval": {"tasks": ["passkey", "mmlu"], "lengths": [128]}}, "unknown task(s) ['mmlu']; allowed: passkey"),
    ({"eval": {"tasks": ["passkey"], "lengths": [0]}}, "eval.lengths must be a positive integer"),
    ({"eval": {"tasks": ["passkey"]}}, "missing key(s) ['lengths']"),
    ({"eval": {"tasks": ["passkey"], "lengths": [128], "baseline": "yes"}}, "eval.baseline must be true or false"),
    ({"dtype": "float8"}, "dtype must be one of float32"),
])
def test_bad_recipes_name_what_is_allowed(change, message):
    with pytest.raises(ValueError) as e:
        parse_recipe({**BASE, **change}, ROOT, "bad")
    assert message in str(e.value)


def test_profile_paths_are_relative_to_the_recipe(tmp_path):
    from attnpatch import Profile

    (tmp_path / "profiles").mkdir()
    Profile("p", None, {0: {"local_blocks": 2}}).save(tmp_path / "profiles" / "p.json")
    (tmp_path / "r.yaml").write_text(
        yaml.safe_dump({**BASE, "patch": {"method": "a_shape", "profile": "profiles/p.json"}}))
    assert load_recipe(tmp_path / "r.yaml").spec.profile.layers == {0: {"local_blocks": 2}}
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")


def test_a_tiny_recipe_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", str(ROOT / "recipes" / "tiny-smoke.yaml"), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    runs = [json.loads(p.read_text()) for p in sorted(out.glob("*_L256.json"))]
    assert sorted(r["method"] for r in runs) == ["dense", "xattention"]
    sparse = next(r for r in runs if r["method"] == "xattention")
    assert sparse["decode"] == "streaming" and 0 < sparse["density"] <= 1 and sparse["recipe"] == "tiny-smoke"
    assert set(sparse["scores"]) == {"passkey", "perplexity"}
    assert "| 256 | xattention" in (out / "report.md").read_text()
    assert json.loads((out / "recipe.json").read_text())["spec"]["decode_options"] == {"window": 64, "n_sink": 4}


def test_run_checks_the_recipe_before_loading(monkeypatch, tmp_path, capsys):
    import attnpatch.models

    monkeypatch.setattr(attnpatch.models, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({**BASE, "extra": 1}))
    assert main(["run", str(tmp_path / "r.yaml")]) == 2
    assert "unknown key(s) ['extra']" in capsys.readouterr().err
    assert main(["run", str(ROOT / "recipes" / "quickstart.yaml"), "--check"]) == 0
