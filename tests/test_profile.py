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
