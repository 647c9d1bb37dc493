"""Calibration targets (error, density, accuracy floor), BLASST's per-phase fit as a profile, and the
run-time scaling of profiles (profile_shift, profile_sparsity)."""

import json

import pytest
import torch
from method_cases import CharTokenizer, small_options

from attnpatch import PatchSpec, patch_model
from attnpatch.calibrate import calibrate
from attnpatch.calibrate.record import record_layers
from attnpatch.calibrate.search import dense_outputs, evaluate, search_layer
from attnpatch.calibrate.target import Target
from attnpatch.cli import main
from attnpatch.registry import get_method
from attnpatch.testing import tiny_model

XATT = small_options(get_method("xattention", "prefill")) | {"stride": 4}


_Tok = CharTokenizer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("cal") / "data.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"{i} the quick brown fox jumps over the lazy dog " * 6})
                              for i in range(2)))
    return str(path)


@pytest.mark.parametrize(("value", "message"), [
    ("errr=0.1", "unknown calibration target 'errr'; allowed: error"),
    ("error=1.5", "must be in (0, 1), got 1.5"),
    ("density=0", "must be in (0, 1], got 0"),
    ("accuracy=x", "accuracy target must be a number"),
    ("0.3", "error=X, density=X or accuracy=X"),
    ({"density": 0.3, "error": 0.1}, "error=X, density=X or accuracy=X"),
])
def test_bad_targets_name_what_is_allowed(value, message):
    with pytest.raises(ValueError) as e:
        Target.parse(value)
    assert message in str(e.value)


def test_targets_parse():
    assert Target.parse(0.05) == Target("error", 0.05) and Target.parse("density=0.3").label == "den0.3"
    assert Target.parse({"accuracy": 0.9}) == Target("accuracy", 0.9)


def test_density_search_lands_near_the_target_per_head():
    model = tiny_model("llama")
    torch.manual_seed(0)
    layers = record_layers(model, [torch.randint(3, 256, (1, 192)) for _ in range(2)])
    info = get_method("xattention", "prefill")
    layer = layers[1]
    for goal in (0.5, 0.8):
        fit = search_layer(info, info.cls.knob, XATT, layer, None, steps=6, density=goal)
        err, den = evaluate(info, {**XATT, "threshold": fit.values}, layer, dense_outputs(layer))
        assert torch.allclose(den, torch.tensor(fit.density, dtype=torch.float64))  # reported = real
        coord = info.cls.knob.coord(torch.tensor(fit.values, dtype=torch.float64))
        at_end = (coord <= 2 ** -6 + 1e-6) | (coord >= 1 - 2 ** -6 - 1e-6)  # the target is out of the head's reach
        assert all(abs(d - goal) < 0.1 or bool(e)
                   for d, e in zip(fit.density, at_end, strict=True)), (goal, fit.density)
    assert any(abs(d - 0.8) < 0.1 for d in fit.density)
    with pytest.raises(ValueError, match="exactly one"):
        search_layer(info, info.cls.knob, XATT, layer, 0.1, density=0.5)


def test_calibrate_to_a_density(data):
    model = tiny_model("llama")
    profile = calibrate(model, _Tok(), "xattention", target="density=0.7", data=data, samples=2, lengths=(128,),
                        options=XATT, steps=5, progress=False)
    assert profile.meta["target"] == {"kind": "density", "value": 0.7} and profile.name == "xattention-den0.7"
    assert abs(profile.meta["achieved"]["density"] - 0.7) < 0.1
    with pytest.raises(ValueError, match="target= or target_error=, not both"):
        calibrate(model, _Tok(), "xattention", target="density=0.7", target_error=0.1, data=data)


def test_accuracy_floor_searches_the_tolerance():
    from transformers import AutoTokenizer

    from attnpatch.models import smollm2_dir

    tok = AutoTokenizer.from_pretrained(smollm2_dir())
    model = tiny_model("llama", vocab_size=len(tok), max_position_embeddings=1024)
    profile = calibrate(model, tok, "xattention", target="accuracy=0.9", data="text", samples=1, lengths=(128,),
                        options=XATT, steps=2, progress=False, accuracy_prompts=1, accuracy_steps=2)
    acc = profile.meta["accuracy"]
    assert (acc["task"] == "passkey" and len(acc["tried"]) >= 2
            and acc["met"] == (acc["score"] >= 0.9 * acc["dense_score"]))
    assert 0.005 <= acc["tolerance"] <= 0.3 and set(profile.layers) == {0, 1}


def test_blasst_calibrates_both_phases_and_scales_by_sparsity(data):
    model = tiny_model("llama")
    grid = (1e-2, 0.1, 1.0)
    profile = calibrate(model, _Tok(), "blasst", target="error=0.05", data=data, samples=2, lengths=(96, 128),
                        options={"block_size": 16}, progress=False, lambda_grid=grid, decode_steps=2)
    first = profile.layers[0]
    assert first["decode"] == "blasst" and first["decode_options"]["page_size"] == 16
    assert set(profile.meta["fit"]) == {"prefill", "decode"} and profile.meta["achieved"]["error"] <= 0.05 + 1e-9
    assert [n for n, _ in profile.meta["fit"]["prefill"]["points"]] == [96, 96, 128, 128]
    table = profile.meta["a_of_s"]["decode"]
    assert table and all(a1 >= a0 for (_, a0), (_, a1) in zip(table, table[1:], strict=False))  # more skip, larger a
    share = table[0][0]
    profile.meta["a_of_s"].pop("prefill")
    with patch_model(model, "blasst", profile=profile, profile_sparsity=share) as patch:
        assert patch.state.plans[1].decode.a == pytest.approx(table[0][1])
        assert patch.state.plans[1].prefill.a == first["prefill_options"]["a"]
    with pytest.raises(ValueError, match=r"outside its decode a\(S\) table"):
        PatchSpec.build("blasst", profile=profile, profile_sparsity=0.999)
    with pytest.raises(ValueError, match="sets decode method blasst; patch with decode='blasst'"):
        patch_model(model, "blasst", decode="streaming", profile=profile)


def test_profile_shift_moves_the_knob_denser_or_sparser(data):
    model = tiny_model("llama")
    profile = calibrate(model, _Tok(), "xattention", target=0.1, data=data, samples=1, lengths=(128,), options=XATT,
                        steps=3, progress=False)
    knob = get_method("xattention", "prefill").cls.knob
    base = torch.tensor(profile.layers[0]["prefill_options"]["threshold"], dtype=torch.float64)
    for shift in (0.2, -0.2):
        with patch_model(model, "xattention", profile=profile, profile_shift=shift) as patch:
            got = torch.tensor(patch.state.plans[0].prefill.threshold, dtype=torch.float64)
        want = knob.value((knob.coord(base) + shift).clamp(0, 1))
        assert torch.allclose(got, want) and bool(((got - base) * shift >= 0).all())
    with pytest.raises(ValueError, match=r"profile_shift must be a number in \[-1, 1\]"):
        PatchSpec.build("xattention", profile=profile, profile_shift=2)
    with pytest.raises(ValueError, match=r"no a\(S\) table.*use profile_shift"):
        PatchSpec.build("xattention", profile=profile, profile_sparsity=0.5)
    spec = PatchSpec.parse({"method": "xattention", "profile": profile, "profile_shift": "0.1"})
    assert spec.profile_shift == 0.1 and "shifted +0.1" in str(spec) and spec.to_dict()["profile_shift"] == 0.1


@pytest.mark.parametrize(("argv", "message"), [
    (["--target-error", "0.1", "--target-density", "0.5"], "give one target"),
    (["--target-density", "1.5"], "must be in (0, 1], got 1.5"),
    (["--accuracy-floor", "0"], "score as a share of the dense model's) must be in (0, 1], got 0"),
])
def test_calibrate_cli_checks_targets_before_loading(monkeypatch, capsys, argv, message):
    import attnpatch.models

    monkeypatch.setattr(attnpatch.models, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    assert main(["calibrate", "--method", "xattention", *argv]) == 2
    assert message in capsys.readouterr().err


def test_blasst_every_fit_keeps_each_calibration_prompt_within_the_tolerance():
    from attnpatch.calibrate.blasst_fit import LambdaTable, fit_table

    grid = [1e-3, 1e-2, 0.1, 1.0]
    # two prompts of 100 tokens: the first tolerates λ = 0.1, the second only λ = 1e-3 (error per grid λ)
    table = LambdaTable("prefill", grid, [100, 100], [[0.0, 0.01, 0.04, 0.2], [0.03, 0.08, 0.2, 0.5]],
                        [[0.0, 0.1, 0.3, 0.6], [0.0, 0.2, 0.4, 0.7]])
    typical, points = fit_table(table, tolerance=0.05)
    bound, same = fit_table(table, tolerance=0.05, rule="every")
    # each prompt's limit, interpolated in log λ where its error crosses 0.05: 0.04 → 0.2 over 0.1 → 1,
    # and 0.03 → 0.08 over 1e-3 → 1e-2
    limits = [0.1 * 10 ** ((0.05 - 0.04) / (0.2 - 0.04)), 1e-3 * 10 ** ((0.05 - 0.03) / (0.08 - 0.03))]
    assert points == same and [n for n, _ in points] == [100, 100]
    assert [lam for _, lam in points] == pytest.approx(limits)
    assert typical == pytest.approx(100 * (limits[0] * limits[1]) ** 0.5) and bound == pytest.approx(100 * limits[1])
    hull = LambdaTable("prefill", grid, [100], [[0.06, 0.01, 0.2, 0.3]], [[0.0, 0.1, 0.3, 0.6]])
    assert fit_table(hull, tolerance=0.05)[1] == [(100, 1e-3)]  # the running max: never past a failing λ
    loose = LambdaTable("prefill", grid, [100], [[0.0, 0.0, 0.01, 0.02]], [[0.0, 0.1, 0.3, 0.6]])
    assert fit_table(loose, tolerance=0.05)[1] == [(100, 1.0)]
    with pytest.raises(ValueError, match="must be one of geomean, every"):
        fit_table(table, tolerance=0.05, rule="max")
    with pytest.raises(ValueError, match="give a tolerance"):
        fit_table(table, target_skipped=0.3, rule="every")


def test_lambda_fit_is_checked(data):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="lambda_fit must be one of geomean, every"):
        calibrate(model, _Tok(), "blasst", data=data, samples=1, lengths=(64,), lambda_fit="median", progress=False)
    with pytest.raises(ValueError, match="applies to blasst's λ = a / L fit only, not to 'xattention'"):
        calibrate(model, _Tok(), "xattention", data=data, samples=1, lengths=(64,), lambda_fit="every", progress=False)


def test_blasst_every_fit_is_recorded_in_the_profile(data):
    model = tiny_model("llama")
    kw = dict(target="error=0.05", data=data, samples=2, lengths=(96,), options={"block_size": 16}, progress=False,
              lambda_grid=(1e-2, 0.1, 1.0), decode_steps=2)
    typical = calibrate(model, _Tok(), "blasst", **kw)
    bound = calibrate(model, _Tok(), "blasst", lambda_fit="every", **kw)
    assert typical.meta["lambda_fit"] == "geomean" and bound.meta["lambda_fit"] == "every"
    for phase in ("prefill", "decode"):
        assert bound.meta["fit"][phase]["a"] == pytest.approx(
            min(lam * n for n, lam in bound.meta["fit"][phase]["points"]))
        assert bound.meta["fit"][phase]["a"] <= typical.meta["fit"][phase]["a"] + 1e-9
