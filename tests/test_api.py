"""The public API: method table, option validation, unpatch/replace, profiles, errors that say what is allowed."""

import pytest
import torch
from conftest import random_ids
from transformers import GPT2Config, GPT2LMHeadModel

import attnpatch
from attnpatch import Profile
from attnpatch.adapters import UnsupportedModelError, get_adapter
from attnpatch.profile import model_fingerprint
from attnpatch.testing import tiny_model


def test_list_methods_describes_every_method():
    methods = {(m["phase"], m["name"]): m for m in attnpatch.list_methods()}
    assert {("prefill", "dense"), ("decode", "dense"), ("prefill", "blasst"), ("decode", "blasst"),
            ("prefill", "a_shape"), ("decode", "streaming")} <= set(methods)
    assert methods["prefill", "a_shape"]["options"] == {"block_size": 64, "sink_blocks": 1, "local_blocks": 8,
                                                     "dense_tail": 0}
    assert methods["decode", "streaming"]["options"] == {"n_sink": 4, "window": 512}
    assert methods["prefill", "blasst"]["options"] == {"a": 128.0, "convention": "scaled", "block_size": 128}
    assert methods["decode", "blasst"]["options"] == {"a": 1.0, "convention": "scaled", "page_size": 128}
    assert all(m["description"] for m in methods.values())
    assert {m["name"] for m in attnpatch.list_methods("decode")} >= {"dense", "streaming", "blasst"}


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(method="nope"), r"unknown prefill method 'nope'; available prefill methods: .*a_shape.*dense"),
        (dict(method="streaming"), r"decode='streaming'"),
        (dict(decode="a_shape"), r"method='a_shape'"),
        (dict(decode="nope"), r"available decode methods: blasst, dense, (\w+, )*streaming"),
        (dict(method="a_shape", blocksize=64),
         r"unknown option 'blocksize'.*block_size, dense_tail, local_blocks, sink_blocks"),
        (dict(method="dense", window=4), r"unknown option 'window'.*allowed options: none"),
        (dict(method="a_shape", block_size="48"), r"block_size.*one of 16, 32, 64, 128, got 48"),
        (dict(method="a_shape", block_size=64.0), r"block_size.*one of 16, 32, 64, 128.*\(float\)"),
        (dict(method="a_shape", block_size=48), r"block_size.*one of 16, 32, 64, 128"),
        (dict(method="a_shape", block_size=True), r"block_size"),
        (dict(method="a_shape", local_blocks=0), r"local_blocks.*int >= 1"),
        (dict(method="a_shape", sink_blocks=1.5), r"sink_blocks.*int >= 0"),
        (dict(decode="streaming", window=-1), r"window.*int >= 1"),
        (dict(method=3), r"prefill method must be a name"),
        (dict(method="blasst", a=float("nan")), r"option 'a'.*NaN"),
        (dict(method="blasst", decode="blasst", a=2.0), r"declared by both.*prefill_options=.*decode_options="),
        (dict(method="a_shape:local_blocks"), r"must look like key=value"),
        (dict(method="a_shape:local_blocks=x"), r"local_blocks.*int >= 1, got 'x'"),
        (dict(backend="cuda"), r"unknown backend 'cuda'; allowed: auto, sparse, reference, triton, flex, flash"),
    ],
)
def test_bad_input_names_what_is_allowed(llama, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        attnpatch.patch_model(llama, **kwargs)
    assert llama.config._attn_implementation == "sdpa"  # a refused patch leaves the model untouched


def test_unsupported_architecture_names_the_families():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=32))
    families = "gemma3_text, llama, mistral, qwen2, qwen3"
    with pytest.raises(UnsupportedModelError, match=f"supported families: {families}"):
        attnpatch.patch_model(gpt2)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        attnpatch.patch_model(torch.nn.Linear(2, 2))


@torch.no_grad()
def test_unpatch_restores_the_original_exactly(llama):
    ids = random_ids(1, 80)
    ref = llama(ids).logits
    patch = attnpatch.patch_model(llama, method="a_shape", block_size=16, local_blocks=2)
    assert llama.config._attn_implementation == "attnpatch"
    assert not torch.equal(llama(ids).logits, ref)
    patch.unpatch()
    assert llama.config._attn_implementation == "sdpa" and not llama.base_model._forward_pre_hooks
    assert not any(hasattr(m, "_attnpatch_state") for m in llama.modules())
    assert torch.equal(llama(ids).logits, ref)
    patch.unpatch()  # idempotent


@torch.no_grad()
def test_unpatch_restores_eager_too():
    model = tiny_model("qwen2")
    model.set_attn_implementation("eager")
    ref = model(random_ids(1, 20)).logits
    with attnpatch.patch_model(model, decode="streaming"):
        pass
    assert model.config._attn_implementation == "eager"
    assert torch.equal(model(random_ids(1, 20)).logits, ref)


@torch.no_grad()
def test_patching_again_suspends_the_old_patch_until_the_new_one_is_removed(llama):
    first = attnpatch.patch_model(llama, method="a_shape", block_size=16, local_blocks=2)
    second = attnpatch.patch_model(llama, decode="streaming", n_sink=2, window=8)
    assert not first.active and second.active
    assert len(llama.base_model._forward_pre_hooks) == 1
    llama(random_ids(1, 40))
    assert first.stats().layers[0]["prefill_calls"] == 0 and second.stats().layers[0]["prefill_calls"] == 1
    second.unpatch()
    assert first.active
    llama(random_ids(1, 40))
    assert first.stats().layers[0]["prefill_calls"] == 1
    attnpatch.unpatch_model(llama)
    assert llama.config._attn_implementation == "sdpa" and not llama.base_model._forward_pre_hooks


def test_adapter_reads_sliding_window_layers():
    assert get_adapter(tiny_model("llama").config).sliding_windows(tiny_model("llama").config) == [None, None]
    q = tiny_model("qwen2", sliding_window=8).config
    assert get_adapter(q).sliding_windows(q) == [None, 8]
    m = tiny_model("mistral", sliding_window=8).config
    assert get_adapter(m).sliding_windows(m) == [8, 8]
    assert get_adapter(q).heads(q) == (4, 2, 16)
    g = tiny_model("gemma3", sliding_window=8).config
    assert g.model_type == "gemma3_text" and get_adapter(g).sliding_windows(g) == [8, None]
    assert get_adapter(g).heads(g) == (4, 1, 32)


@torch.no_grad()
def test_profile_overrides_per_layer_and_roundtrips(llama, tmp_path):
    profile = Profile("test", model_fingerprint(llama), {1: {"method": "dense"}, 0: {"local_blocks": 3}})
    profile.save(tmp_path / "p.json")
    loaded = Profile.load(tmp_path / "p.json")
    assert loaded == profile
    with attnpatch.patch_model(llama, method="a_shape", profile=loaded, block_size=16, local_blocks=2) as patch:
        llama(random_ids(1, 128))
        layers = patch.stats().layers
        assert patch.state.plans[0].prefill.local_blocks == 3
    assert layers[0]["prefill_method"] == "a_shape" and layers[0]["density"] < 1
    assert layers[1]["prefill_method"] == "dense" and layers[1]["density"] == 1.0


def test_profile_errors(llama):
    other = tiny_model("qwen2")
    with pytest.raises(ValueError, match=r"made for a qwen2 \(2 layers.*this model is a llama"):
        attnpatch.patch_model(llama, profile=Profile.for_model(other, name="x"))
    with pytest.raises(ValueError, match=r"names layers \[5\]; the model has layers 0..1"):
        attnpatch.patch_model(llama, profile=Profile("x", None, {5: {}}))
    with pytest.raises(ValueError, match="unknown option 'bogus'"):
        attnpatch.patch_model(llama, method="a_shape", profile=Profile("x", None, {0: {"bogus": 1}}))


def test_cli_methods_prints_the_table(capsys):
    from attnpatch.cli import main

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ("dense", "a_shape", "streaming"):
        assert name in out
    assert "local_blocks=8" in out


def test_cli_bench_needs_a_gpu(capsys):
    from attnpatch.cli import main

    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "kernels", "--parts", "decode"])
    assert exit_info.value.code == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


@torch.no_grad()
def test_backends_fall_back_to_the_reference_and_say_why(llama):
    ids = random_ids(1, 128)
    outs = {}
    for backend in ("reference", "auto", "triton", "flex"):
        with attnpatch.patch_model(llama, method="a_shape", backend=backend, block_size=16, local_blocks=2) as patch:
            outs[backend] = llama(ids).logits
            stats = patch.stats()
        ran, declined = stats.backends, stats.backend_declined
        if backend == "reference":
            assert set(ran) == {"prefill: reference"} and not declined
        elif backend == "auto":  # on CPU: flash and triton say why not, the reference runs
            assert set(ran) == {"prefill: reference"}
            assert any(k.startswith("prefill: flash: ") for k in declined)
            assert any(k.startswith("prefill: triton: needs a CUDA device") for k in declined)
        elif backend == "triton":
            assert set(ran) == {"prefill: reference"} and all(k.startswith("prefill: triton: ") for k in declined)
        else:
            assert set(ran) == {"prefill: flex"} and not declined
    for backend in ("auto", "triton", "flex"):
        torch.testing.assert_close(outs[backend], outs["reference"], atol=1e-4, rtol=1e-4)
