"""`infiniretri`: chunked reading past the model's window with a bounded cache; exact when nothing is dropped."""

import pytest
import torch
import torch.nn.functional as F
from conftest import cache_arg, random_ids
from transformers import DynamicCache

import attnpatch
from attnpatch.cache.infiniretri_layer import InfiniRetriLayer, rerotate
from attnpatch.methods.decode.infiniretri import _inv_freq, generate_long, read_long
from attnpatch.testing import tiny_model

GEN = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)


@torch.no_grad()
@pytest.mark.parametrize("with_question", [False, True])
def test_a_budget_covering_everything_equals_dense_generation(llama, with_question):
    ids, question = random_ids(1, 70, seed=1), random_ids(1, 5, seed=2)
    full = torch.cat([ids, question], 1) if with_question else ids
    dense = llama.generate(full, **GEN)[:, full.shape[1]:]
    with attnpatch.patch_model(llama, decode="infiniretri", budget=200, chunk_size=16):
        got = generate_long(llama, ids, question if with_question else None, **GEN)
    assert torch.equal(got, dense)


@torch.no_grad()
def test_an_input_longer_than_the_window_reads_with_a_bounded_cache_and_positions():
    model = tiny_model("llama", max_position_embeddings=64)
    budget, chunk, q = 20, 24, 4
    seen = []

    def before(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        n = kwargs["input_ids"].shape[1]
        seen.append(cache.get_seq_length() + n)  # the highest position this forward uses, plus one

    handle = model.base_model.register_forward_pre_hook(before, with_kwargs=True)
    try:
        with attnpatch.patch_model(model, decode="infiniretri", budget=budget, chunk_size=chunk, phrase=3):
            read = read_long(model, random_ids(2, 300, seed=3), random_ids(2, q, seed=4))
            lengths = {layer.keys.shape[2] for layer in read.cache.layers}
            out = model.generate(read.input_ids, **cache_arg(model, read.cache), attention_mask=torch.ones_like(
                read.input_ids), **GEN)
    finally:
        handle.remove()
    assert read.retained == [budget] * (300 // chunk)
    assert lengths == {read.input_ids.shape[1] - 1} and max(lengths) <= budget + chunk + q
    assert max(seen) <= budget + chunk + q + GEN["max_new_tokens"] <= 64
    assert out.shape == (2, read.input_ids.shape[1] + 5)


@torch.no_grad()
def test_rerotated_keys_are_the_keys_encoded_at_the_new_positions(llama):
    """Layer 0's keys depend on the token and its position only: the kept keys moved to 0..R-1 must
    equal a fresh encoding of the kept tokens alone."""
    ids = random_ids(1, 40, seed=5)
    keep = torch.tensor([[0, 3, 4, 10, 22, 23, 39]])
    cache, fresh = DynamicCache(config=llama.config), DynamicCache(config=llama.config)
    llama(ids, **cache_arg(llama, cache), use_cache=True)
    llama(ids[:, keep[0]], **cache_arg(llama, fresh), use_cache=True)
    keys = cache.layers[0].keys[:, :, keep[0]]
    moved = rerotate(keys, torch.arange(7) - keep, _inv_freq(llama))
    torch.testing.assert_close(moved, fresh.layers[0].keys, atol=1e-5, rtol=1e-4)


def test_scores_are_the_smoothed_attention_mass_of_the_last_queries():
    g = torch.Generator().manual_seed(6)
    q, k = torch.randn(1, 4, 10, 8, generator=g), torch.randn(1, 2, 30, 8, generator=g)
    layer = InfiniRetriLayer(scores_here=True, phrase=3)
    layer.score_queries = 2
    layer.record_scores(q, k, 0.35)
    mass = torch.zeros(30)
    for h in range(4):
        for i, pos in enumerate((28, 29)):
            s = (k[0, h // 2, : pos + 1] @ q[0, h, 8 + i]) * 0.35
            mass[: pos + 1] += torch.softmax(s, 0)
    ref = F.conv1d(F.pad(mass.view(1, 1, -1), (1, 1)), torch.ones(1, 1, 3)).view(1, -1)
    torch.testing.assert_close(layer.scores, ref)


@torch.no_grad()
def test_read_long_refuses_what_it_cannot_do(llama):
    ids = random_ids(1, 100, seed=7)
    with pytest.raises(ValueError, match="decode='infiniretri'"):
        read_long(llama, ids)  # not patched with the method
    with attnpatch.patch_model(llama, decode="infiniretri", budget=4000, chunk_size=200), \
            pytest.raises(ValueError, match="exceed the model's"):
        read_long(llama, ids)
    gemma = tiny_model("gemma3", sliding_window=8)
    with attnpatch.patch_model(gemma, decode="infiniretri", budget=16, chunk_size=16), \
            pytest.raises(ValueError, match="every layer full"):
        read_long(gemma, ids)


@pytest.mark.parametrize(("options", "allowed"), [({"chunk_size": 4}, ">= 8"), ({"budget": 0}, ">= 1"),
                                                 ({"score_layer": -2}, ">= -1")])
def test_bad_options_name_the_allowed_range(llama, options, allowed):
    with pytest.raises(ValueError, match=allowed):
        attnpatch.patch_model(llama, decode="infiniretri", **options)


@torch.no_grad()
def test_a_score_layer_past_the_model_is_refused(llama):
    with attnpatch.patch_model(llama, decode="infiniretri", score_layer=50), \
            pytest.raises(ValueError, match="score_layer"):
        llama.generate(random_ids(1, 10), **GEN)


@torch.no_grad()
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_static_generation_after_reading_equals_dynamic(family):
    """`generate_long(..., cache_implementation="static")` copies what the reading kept into a static
    cache sized for the generation and generates the tokens the dynamic cache does (an input 4× the
    budget, so the reading really dropped tokens)."""
    model = tiny_model(family)
    ids, question = random_ids(2, 160, seed=8), random_ids(2, 4, seed=9)
    with attnpatch.patch_model(model, decode="infiniretri", budget=24, chunk_size=32, phrase=3):
        dynamic = generate_long(model, ids, question, **GEN)
        static = generate_long(model, ids, question, cache_implementation="static", **GEN)
    assert torch.equal(static, dynamic)


@torch.no_grad()
def test_a_compiled_step_on_the_static_copy_equals_eager():
    """The static copy of what was read decodes in a compiled step (fullgraph) as it does eagerly."""
    from attnpatch.cache.static_copy import static_copy

    model = tiny_model("llama")
    with attnpatch.patch_model(model, decode="infiniretri", budget=24, chunk_size=32, phrase=3):
        read = read_long(model, random_ids(2, 120, seed=10))
        logits = {}
        for mode in ("eager", "compiled"):
            cache = static_copy(read.cache, model.config, read.input_ids.shape[1] + 4)
            forward = model
            if mode == "compiled":
                torch._dynamo.reset()
                forward = torch.compile(model, backend="eager", fullgraph=True)
            tok, out = read.input_ids[:, -1:], []
            for _ in range(3):
                step = forward(input_ids=tok, use_cache=True, **cache_arg(model, cache)).logits[:, -1]
                out.append(step)
                tok = step.argmax(-1, keepdim=True)
            logits[mode] = torch.stack(out)
        torch._dynamo.reset()
    torch.testing.assert_close(logits["compiled"], logits["eager"], rtol=0, atol=1e-5)


def test_static_generation_needs_its_length_and_a_known_cache(llama):
    ids = random_ids(1, 40, seed=11)
    with attnpatch.patch_model(llama, decode="infiniretri", budget=16, chunk_size=16):
        with pytest.raises(ValueError, match="needs max_new_tokens"):
            generate_long(llama, ids, cache_implementation="static", do_sample=False)
        with pytest.raises(ValueError, match="'dynamic' or 'static'"):
            generate_long(llama, ids, cache_implementation="offloaded", max_new_tokens=2)


def test_static_copy_refuses_what_it_cannot_hold(llama):
    from attnpatch.cache.static_copy import static_copy

    cache = DynamicCache(config=llama.config)
    with torch.no_grad():
        llama(random_ids(1, 12, seed=12), **cache_arg(llama, cache), use_cache=True)
    with pytest.raises(ValueError, match="below the 12 tokens"):
        static_copy(cache, llama.config, 8)
    gemma = tiny_model("gemma3", sliding_window=8)
    with pytest.raises(ValueError, match="layers hold|sliding"):
        gcache = DynamicCache(config=gemma.config)
        with torch.no_grad():
            gemma(random_ids(1, 12, seed=12), **cache_arg(gemma, gcache), use_cache=True)
        static_copy(gcache, gemma.config, 40)
