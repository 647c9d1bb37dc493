"""`streaming`: the cache really stays at sink + window, and decode equals dense attention over what is kept."""

import pytest
import torch
from conftest import cache_arg, left_padded, random_ids

import attnpatch
from attnpatch.cache import SinkWindowLayer
from attnpatch.testing import tiny_model

N_SINK, WINDOW = 4, 8


def _stored_lengths(cache):
    return [layer.stored_length() for layer in cache.layers if isinstance(layer, SinkWindowLayer)]


@torch.no_grad()
def test_cache_never_exceeds_sink_plus_window_over_200_tokens(tiny):
    seen = []

    def after_forward(module, args, kwargs, output):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        seen.append(_stored_lengths(cache))

    handle = tiny.base_model.register_forward_hook(after_forward, with_kwargs=True)
    try:
        with attnpatch.patch_model(tiny, decode="streaming", n_sink=N_SINK, window=WINDOW) as patch:
            out = tiny.generate(random_ids(1, 20), max_new_tokens=200, min_new_tokens=200, do_sample=False)
            stats = patch.stats()
    finally:
        handle.remove()
    assert out.shape[1] == 220 and len(seen) == 200
    windows = [d["sliding_window"] for d in stats.layers]
    n_streaming = sum(w is None for w in windows)
    assert all(len(s) == n_streaming for s in seen)
    if n_streaming:
        assert max(max(s) for s in seen) == N_SINK + WINDOW
    for d in stats.layers:
        assert d["decode_calls"] == 199
        if d["sliding_window"] is None:
            assert d["max_decode_keys"] == N_SINK + WINDOW + 1
        else:  # sliding-window layers keep transformers' own window cache
            assert d["max_decode_keys"] <= d["sliding_window"]


@torch.no_grad()
def test_decode_equals_dense_attention_over_kept_tokens(llama):
    """Each decode step equals the unpatched model run with a mask that hides the evicted tokens; in a
    left-padded batch the sinks are each row's first real tokens, not padding."""
    prompt, steps = 30, 4
    pads = [0, 5]
    ids, pad = left_padded(2, prompt + steps, pads, seed=7)
    got = []
    with attnpatch.patch_model(llama, decode="streaming", n_sink=N_SINK, window=WINDOW):
        from transformers import DynamicCache

        cache = DynamicCache(config=llama.config)
        llama(ids[:, :prompt], attention_mask=pad[:, :prompt], **cache_arg(llama, cache), use_cache=True)
        for t in range(steps):
            p = prompt + t
            out = llama(ids[:, p : p + 1], attention_mask=pad[:, : p + 1], **cache_arg(llama, cache), use_cache=True)
            got.append(out.logits[:, -1])
            assert max(_stored_lengths(cache)) <= N_SINK + WINDOW
    n = prompt + steps
    mask = torch.ones(2, n, n, dtype=torch.bool).tril()
    for b, start in enumerate(pads):
        for p in range(prompt, n):
            mask[b, p, start + N_SINK : p - WINDOW] = False  # evicted: between the row's sinks and the window
    mask4d = (mask & pad.bool()[:, None, :])[:, None]
    ref = llama(ids, attention_mask=mask4d).logits
    for t in range(steps):
        torch.testing.assert_close(got[t], ref[:, prompt + t], atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_streaming_composes_with_sparse_prefill(llama):
    with attnpatch.patch_model(llama, method="a_shape", decode="streaming", block_size=16, local_blocks=2,
                               n_sink=4, window=32) as patch:
        out = llama.generate(random_ids(1, 96), max_new_tokens=10, do_sample=False)
        d = patch.stats().layers[0]
    assert out.shape[1] == 106
    assert d["prefill_method"] == "a_shape" and d["decode_method"] == "streaming"
    assert d["density"] < 1 and d["max_decode_keys"] == 37


@pytest.mark.parametrize("family,window", [("llama", None), ("qwen2", 8), ("gemma3", 8)],
                         ids=["llama", "qwen2", "gemma3"])
@torch.no_grad()
def test_a_static_cache_reads_what_the_evicting_cache_keeps(family, window):
    """On a static cache (which cannot evict) each decode step reads the sinks + window it would have
    kept: the tokens and scores of the evicting cache, on a left-padded batch; the steps report the
    gather, the window layers their own window."""
    model = tiny_model(family, sliding_window=window)
    ids, mask = left_padded(2, 40, [0, 5], seed=3)
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0, output_scores=True,
              return_dict_in_generate=True)
    with attnpatch.patch_model(model, decode="streaming", n_sink=N_SINK, window=WINDOW) as patch:
        evicting = model.generate(ids, **kw)
        static = model.generate(ids, cache_implementation="static", **kw)
        stats = patch.stats()
    assert torch.equal(static.sequences, evicting.sequences)
    for a, b in zip(static.scores, evicting.scores, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    full_layers = sum(d["sliding_window"] is None for d in stats.layers)
    assert stats.backends["decode: sink-window gather"] == 11 * full_layers


def test_sink_window_gather_hides_what_the_bounds_hide():
    """The gathered keys are each row's first real ones and its last written ones; a left-padded row's
    padding and a static cache's unwritten slots are never attended, and short rows repeat no key."""
    from attnpatch.methods.decode.streaming import sink_window_decode
    from attnpatch.sparsity import KeyBounds

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 1, 8, generator=g), torch.randn(2, 2, 40, 8, generator=g),
               torch.randn(2, 2, 40, 8, generator=g))
    end = torch.tensor([30, 9])
    start = torch.tensor([0, 3])
    valid = (torch.arange(40) < end[:, None]) & (torch.arange(40) >= start[:, None])
    k[~valid.view(2, 1, 40, 1).expand_as(k)] = float("nan")  # unwritten / padding slots are never read
    bounds = KeyBounds(key_valid=valid, key_end=end, key_first=start)
    out = sink_window_decode(q, k, v, bounds, n_sink=2, window=4, scale=0.35)
    for b, keep in enumerate([[0, 1, 25, 26, 27, 28, 29], [3, 4, 5, 6, 7, 8]]):
        kk, vv = k[b, :, keep].repeat_interleave(2, 0), v[b, :, keep].repeat_interleave(2, 0)
        ref = torch.softmax(q[b] @ kk.transpose(-1, -2) * 0.35, -1) @ vv
        torch.testing.assert_close(out[b], ref, atol=1e-6, rtol=1e-5)
