"""Profiles: per-layer / per-head parameters tied to a checkpoint's architecture and weights."""

import pytest
import torch
from conftest import random_ids

import attnpatch
from attnpatch import Profile
from attnpatch.testing import tiny_model


def test_json_layer_keys_are_read_as_layer_indices(llama, tmp_path):
    profile = Profile("p", None, {"1": {"method": "dense"}})
    assert profile.layers == {1: {"method": "dense"}}
    with attnpatch.patch_model(llama, method="a_shape", block_size=16, local_blocks=2, profile=profile) as patch:
        assert patch.state.plans[1].prefill.name == "dense" and patch.state.plans[0].prefill.name == "a_shape"
    with pytest.raises(ValueError, match="layer key 'first' is not a layer index"):
        Profile("p", None, {"first": {}})


def test_a_profile_is_tied_to_the_weights_unless_told_otherwise(llama):
    profile = Profile.for_model(llama, {0: {"local_blocks": 3}}, name="mine")
    attnpatch.patch_model(llama, method="a_shape", block_size=16, profile=profile).unpatch()
    tuned = tiny_model("llama", seed=1)  # same architecture, other weights
    with pytest.raises(ValueError, match=r"profile 'mine' was made for other weights.*allow_other_weights=True"):
        attnpatch.patch_model(tuned, method="a_shape", block_size=16, profile=profile)
    with attnpatch.patch_model(tuned, method="a_shape", block_size=16, profile=profile, allow_other_weights=True) as p:
        assert p.state.plans[0].prefill.local_blocks == 3


def test_per_layer_errors_name_the_layer(llama):
    profile = Profile("bad", None, {1: {"local_blocks": 0}})
    with pytest.raises(ValueError, match=r"local_blocks.*\(layer 1 of profile 'bad'\)"):
        attnpatch.patch_model(llama, method="a_shape", profile=profile)
    with pytest.raises(ValueError, match=r"unknown option 'bogus'.*\(layer 0 of profile 'x'\)"):
        attnpatch.patch_model(llama, method="a_shape", profile=Profile("x", None, {0: {"bogus": 1}}))


@torch.no_grad()
def test_per_head_values_from_a_profile(llama):
    """A per-head option takes one value per query head, per layer; the wrong count is refused."""
    profile = Profile("heads", None, {0: {"a": [1e-30, 1e-30, 1e4, 1e4]}})
    with attnpatch.patch_model(llama, method="blasst", block_size=16, profile=profile) as patch:
        assert patch.state.plans[0].prefill.a == (1e-30, 1e-30, 1e4, 1e4)
        llama(random_ids(1, 128))
    with pytest.raises(ValueError, match=r"4 per-head values; the layer has 4 query heads|3 per-head values"):
        attnpatch.patch_model(llama, method="blasst", profile=Profile("h", None, {0: {"a": [1.0, 2.0, 3.0]}}))


def test_a_per_layer_per_head_table_as_an_option(llama):
    table = [[1e-30] * 4, [1e4, 1e4, 1e-30, 1e-30]]
    with attnpatch.patch_model(llama, method="blasst", block_size=16, a=table) as patch:
        assert patch.state.plans[1].prefill.a == (1e4, 1e4, 1e-30, 1e-30)
        assert patch.state.plans[0].prefill.a == (1e-30,) * 4
    with pytest.raises(ValueError, match="table of 3 layers; the model has 2"):
        attnpatch.patch_model(llama, method="blasst", a=[[1.0] * 4] * 3)
    with pytest.raises(ValueError, match="NaN"):
        attnpatch.patch_model(llama, method="blasst", a=torch.tensor([[1.0] * 4, [float("nan")] * 4]))


def test_large_tables_go_to_safetensors_and_load_back(llama, tmp_path):
    from attnpatch import profile as profile_mod

    layers = {i: {"method": "blasst", "prefill_options": {"a": [1.0 + i, 2.0, 3.0, 4.0]}} for i in range(2)}
    profile = Profile.for_model(llama, layers, name="big", meta={"note": "x"})
    assert profile.save(tmp_path / "small.json") is None  # 8 numbers: JSON only
    side = profile.save(tmp_path / "big.json", tensors="always")
    assert side == tmp_path / "big.safetensors" and side.is_file()
    text = (tmp_path / "big.json").read_text()
    assert '"tensor": "layers.1.prefill_options.a"' in text and "sha256" in text
    loaded = Profile.load(tmp_path / "big.json")
    assert loaded.layers == profile.layers and loaded.fingerprint == profile.fingerprint
    with attnpatch.patch_model(llama, "blasst", block_size=16, profile=tmp_path / "big.json") as patch:
        assert patch.state.plans[1].prefill.a == (2.0, 2.0, 3.0, 4.0)
    assert profile_mod.TENSOR_THRESHOLD < 10_000
    with pytest.raises(ValueError, match="load the profile JSON that names it"):
        Profile.load(side)
    side.write_bytes(side.read_bytes()[:-1] + b" ")
    with pytest.raises(ValueError, match="sha256 differs"):
        Profile.load(tmp_path / "big.json")
    side.unlink()
    with pytest.raises(FileNotFoundError, match="keeps its tables in"):
        Profile.load(tmp_path / "big.json")
    with pytest.raises(ValueError, match="tensors must be 'auto', 'always' or 'never'"):
        profile.save(tmp_path / "x.json", tensors="sometimes")


def test_profile_scaling_without_a_profile_or_a_knob_is_refused(llama):
    with pytest.raises(ValueError, match="give profile= too"):
        attnpatch.patch_model(llama, "a_shape", profile_shift=0.1)
    with pytest.raises(ValueError, match="records no calibrated knob"):
        attnpatch.patch_model(llama, "a_shape", profile=Profile("p", None, {0: {"local_blocks": 2}}), profile_shift=0.1)


def test_the_weights_hash_is_the_same_in_float32_and_bfloat16_and_changes_with_the_weights():
    """A profile calibrated on a GPU (bf16 load) runs on the CPU (fp32 load) of the same checkpoint."""
    import copy

    from attnpatch.profile import weights_fingerprint

    model = tiny_model("llama", seed=3)
    half = copy.deepcopy(model).to(torch.bfloat16)
    assert weights_fingerprint(model) == weights_fingerprint(half)
    with torch.no_grad():
        next(model.parameters()).mul_(1.5)
    assert weights_fingerprint(model) != weights_fingerprint(half)
