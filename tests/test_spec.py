"""PatchSpec: one parser for Python kwargs, "method:k=v" strings, dicts / YAML and lm-eval model_args."""

import numpy as np
import pytest

from attnpatch import PatchSpec, Profile


def test_flat_options_go_to_the_method_that_declares_them():
    spec = PatchSpec.build("a_shape", "streaming", local_blocks=4, window=256)
    assert (spec.method, spec.decode) == ("a_shape", "streaming")
    assert spec.prefill_options == {"local_blocks": 4} and spec.decode_options == {"window": 256}


def test_an_option_both_methods_declare_must_name_its_phase():
    with pytest.raises(ValueError, match=r"'convention' is declared by both.*prefill_options=.*decode_options="):
        PatchSpec.build("blasst", "blasst", convention="raw")
    spec = PatchSpec.build("blasst", "blasst", prefill_options={"a": 256}, decode_options={"a": 4.0})
    assert spec.prefill_options == {"a": 256.0} and spec.decode_options == {"a": 4.0}
    assert isinstance(spec.prefill_options["a"], float)  # converted to the declared type
    spec = PatchSpec.build("blasst", "blasst", **{"prefill.a": 8, "decode.a": 2})
    assert spec.prefill_options == {"a": 8.0} and spec.decode_options == {"a": 2.0}


def test_strings_carry_options_typed_by_their_declaration():
    spec = PatchSpec.parse("a_shape:local_blocks=4,block_size=32")
    assert spec.prefill_options == {"local_blocks": 4, "block_size": 32}
    spec = PatchSpec.build("blasst:a=1e3,convention=raw", decode="streaming:window=64")
    assert spec.prefill_options == {"a": 1000.0, "convention": "raw"} and spec.decode_options == {"window": 64}
    assert str(spec) == "blasst:a=1000.0,convention=raw + decode streaming:window=64"


@pytest.mark.parametrize("text,pattern", [
    ("nope:x=1", r"unknown prefill method 'nope'"),
    ("a_shape:x=1", r"unknown option 'x' for prefill method 'a_shape'; its options are: block_size"),
    ("a_shape:local_blocks", r"must look like key=value"),
    ("a_shape:local_blocks=1.5", r"local_blocks.*int >= 1, got '1.5'"),
    ("blasst:a=nan", r"NaN"),
    ("streaming", r"'streaming' is a decode method.*decode='streaming'"),
])
def test_bad_strings_name_what_is_allowed(text, pattern):
    with pytest.raises(ValueError, match=pattern):
        PatchSpec.parse(text)


def test_dicts_and_yaml_mappings():
    import yaml

    doc = yaml.safe_load("""
method: a_shape:local_blocks=4
decode: {name: streaming, options: {window: 128}}
options: {sink_blocks: 2}
backend: {prefill: flex, decode: auto}
""")
    spec = PatchSpec.parse(doc)
    assert spec.prefill_options == {"local_blocks": 4, "sink_blocks": 2}
    assert spec.decode_options == {"window": 128} and spec.backend == {"prefill": "flex", "decode": "auto"}
    with pytest.raises(ValueError, match=r"unknown patch spec key\(s\) \['methd'\]; allowed: method, prefill"):
        PatchSpec.parse({"methd": "a_shape"})
    with pytest.raises(ValueError, match="'method' or 'prefill', not both"):
        PatchSpec.parse({"method": "a_shape", "prefill": "blasst"})
    with pytest.raises(ValueError, match="needs 'name'"):
        PatchSpec.parse({"decode": {"window": 3}})
    with pytest.raises(ValueError, match=r"backend mapping keys must be 'prefill' and/or 'decode'"):
        PatchSpec.parse({"backend": {"prefil": "flex"}})


def test_model_args_split_into_spec_and_harness_arguments():
    spec, rest = PatchSpec.from_model_args({"pretrained": "smollm2", "method": "blasst", "a": 128,
                                            "decode": "streaming", "window": "512", "attn_backend": "reference",
                                            "batch_size": 2})
    assert rest == {"pretrained": "smollm2", "batch_size": 2}
    assert spec.prefill_options == {"a": 128.0} and spec.decode_options == {"window": 512}
    assert spec.backend == "reference"
    spec, _ = PatchSpec.from_model_args({"method": "blasst", "decode": "blasst", "prefill.a": 64, "decode.a": 2})
    assert spec.prefill_options == {"a": 64.0} and spec.decode_options == {"a": 2.0}


def test_values_from_numpy_and_profiles_by_path(tmp_path):
    spec = PatchSpec.build("a_shape", block_size=np.int64(32), local_blocks=np.int32(3))
    assert spec.prefill_options == {"block_size": 32, "local_blocks": 3}
    assert type(spec.prefill_options["block_size"]) is int
    Profile("p", None, {0: {"local_blocks": 2}}).save(tmp_path / "p.json")
    spec = PatchSpec.build("a_shape", profile=str(tmp_path / "p.json"))
    assert spec.profile.layers == {0: {"local_blocks": 2}}
    assert spec.to_dict()["profile"]["name"] == "p"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PatchSpec.build("a_shape", profile=tmp_path / "missing.json")


def test_a_spec_is_what_patch_model_takes(llama):
    import attnpatch

    spec = PatchSpec.parse({"method": "a_shape:block_size=16,local_blocks=2", "decode": "streaming:window=8"})
    with attnpatch.patch_model(llama, spec) as patch:
        assert patch.spec == spec
        assert patch.state.plans[0].prefill.local_blocks == 2 and patch.state.plans[0].decode.window == 8
    with pytest.raises(ValueError, match="either a PatchSpec or method/decode/options"):
        attnpatch.patch_model(llama, spec, local_blocks=3)


def test_profile_scaling_through_model_args_and_yaml(tmp_path):
    import yaml

    Profile("p", None, {0: {"threshold": [0.9] * 4}}, {"method": "xattention", "knob": "threshold"}).save(
        tmp_path / "p.json")
    spec, rest = PatchSpec.from_model_args({"method": "xattention", "profile": str(tmp_path / "p.json"),
                                            "profile_shift": "-0.25", "batch_size": 1})
    assert spec.profile_shift == -0.25 and rest == {"batch_size": 1}
    assert spec.effective_profile().layers[0]["threshold"][0] < 0.9  # sparser; the stored profile is untouched
    assert spec.profile.layers[0]["threshold"][0] == 0.9
    doc = yaml.safe_load(f"method: xattention\nprofile: {tmp_path / 'p.json'}\nprofile_shift: 0.1\n")
    assert PatchSpec.parse(doc).effective_profile().layers[0]["threshold"][0] > 0.9
    with pytest.raises(ValueError, match="profile_shift must be a number, got 'lots'"):
        PatchSpec.parse({**doc, "profile_shift": "lots"})
