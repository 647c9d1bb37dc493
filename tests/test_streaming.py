"""`streaming`: the cache really stays at sink + window, and decode equals dense attention over what is kept."""

import torch
from conftest import cache_arg, left_padded, random_ids

import attnpatch
from attnpatch.cache import SinkWindowLayer

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
