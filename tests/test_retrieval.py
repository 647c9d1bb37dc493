"""`retrieval` (RetrievalAttention): the offload split, the indexes, the log-sum-exp merge, recall and bytes."""

import math

import pytest
import torch
from conftest import cache_arg, left_padded
from transformers import DynamicCache

import attnpatch
from attnpatch.cache.retrieval_index import ExactIndex, build_key_ivf, build_query_ivf, recall
from attnpatch.cache.retrieval_layer import IndexConfig, RetrievalLayer, retrieval_report
from attnpatch.methods.base import DecodeContext, DecodeOutput
from attnpatch.methods.decode.retrieval import Retrieval
from attnpatch.sparsity import KeyBounds


def _prefill_and_step(model, ids, mask, **options):
    """Prompt = all but the last token, then one decode step; returns (cache, logits of the step)."""
    cache = DynamicCache(config=model.config)
    with attnpatch.patch_model(model, decode="retrieval", **options):
        model(ids[:, :-1], attention_mask=mask[:, :-1], **cache_arg(model, cache), use_cache=True)
        out = model(ids[:, -1:], attention_mask=mask, **cache_arg(model, cache), use_cache=True)
    return cache, out.logits[:, -1]


@torch.no_grad()
def test_offloaded_part_and_gpu_part_are_the_full_kv_at_their_positions(llama):
    ids, mask = left_padded(2, 41, [0, 7], seed=1)
    dense = DynamicCache(config=llama.config)
    llama(ids, attention_mask=mask, **cache_arg(llama, dense), use_cache=True)
    cache, _ = _prefill_and_step(llama, ids, mask, n_sink=3, window=5)
    for layer, full in zip(cache.layers, dense.layers, strict=True):
        assert isinstance(layer, RetrievalLayer)
        off = layer.offloaded
        assert layer.keys.shape[2] == 3 + 5 + 1 and off.keys.shape[2] == 40 - 8
        positions = torch.cat([layer.positions.cpu(), off.positions], 1)
        assert torch.equal(positions.sort(1).values, torch.arange(41).expand(2, 41))  # each token once
        for b, start in enumerate([0, 7]):
            gpu_real = [p for p in layer.positions[b].tolist() if p >= start]
            assert gpu_real == list(range(start, start + 3)) + list(range(40 - 5, 41))  # sinks, window, new
            assert torch.equal(off.valid[b], off.positions[b] >= start)  # padding is marked, never real
        keys = torch.cat([layer.keys.float(), off.keys], 2)
        values = torch.cat([layer.values, off.values], 2)
        idx = positions.argsort(1).view(2, 1, 41, 1).expand(2, keys.shape[1], 41, keys.shape[-1])
        # the prompt exactly; the decoded token was computed by a separate forward (float rounding)
        torch.testing.assert_close(keys.gather(2, idx)[:, :, :40], full.keys.float()[:, :, :40], rtol=0, atol=0)
        torch.testing.assert_close(values.gather(2, idx)[:, :, :40], full.values[:, :, :40], rtol=0, atol=0)
        torch.testing.assert_close(keys.gather(2, idx), full.keys.float())


def test_exact_index_top_k_is_brute_force_and_skips_padding():
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 3, 50, 8, generator=g)
    valid = torch.ones(2, 50, dtype=torch.bool)
    valid[1, :12] = False
    q = torch.randn(2, 6, 8, generator=g)
    found = ExactIndex(keys, valid).search(q, 7)
    for b in range(2):
        for h in range(6):
            s = keys[b, h // 2] @ q[b, h]
            s[~valid[b]] = float("-inf")
            assert set(found.indices[b, h].tolist()) == set(s.topk(7).indices.tolist())
            assert valid[b, found.indices[b, h]].all()
    everything = ExactIndex(keys, valid).search(q, 1000)  # more than there are: the valid keys, once each
    assert torch.equal(torch.isfinite(everything.scores).sum(-1), valid.sum(-1).view(2, 1).expand(2, 6))


@pytest.mark.parametrize("kind", ["query_ivf", "key_ivf"])
def test_ivf_probing_every_list_is_exact_and_recall_is_reported(kind):
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(2, 2, 120, 8, generator=g)
    valid = torch.ones(2, 120, dtype=torch.bool)
    valid[0, :9] = False
    q = torch.randn(2, 4, 8, generator=g)
    queries = torch.randn(2, 4, 40, 8, generator=g)
    qvalid = torch.ones(2, 40, dtype=torch.bool)

    def build(n_probe):
        if kind == "key_ivf":
            return build_key_ivf(keys, valid, 10, n_probe, 5)
        return build_query_ivf(keys, valid, queries, qvalid, 10, n_probe, 5, links=4)

    exact = ExactIndex(keys, valid).search(q, 9)
    full = build(1000).search(q, 9)
    assert torch.equal(recall(full, exact), torch.ones(2, 4))
    for b in range(2):
        for h in range(4):
            assert set(full.indices[b, h].tolist()) == set(exact.indices[b, h].tolist())
    few = build(1).search(q, 9)
    r = recall(few, exact)
    assert ((r >= 0) & (r <= 1)).all() and (few.scanned < valid.sum(-1, keepdim=True)).all()
    hits = few.indices[torch.isfinite(few.scores)]
    assert hits.numel() and valid[0, few.indices[0][torch.isfinite(few.scores[0])]].all()  # no padding


def test_merge_of_gpu_and_cpu_parts_equals_dense_attention_over_their_union():
    g = torch.Generator().manual_seed(2)
    b, hq, hkv, n, d = 1, 4, 2, 60, 16
    k, v = torch.randn(b, hkv, n, d, generator=g), torch.randn(b, hkv, n, d, generator=g)
    layer = RetrievalLayer(n_sink=2, window=6, top_k=5, index=IndexConfig("exact"))
    layer.update(k[:, :, :-1], v[:, :, :-1])
    keys, values = layer.update(k[:, :, -1:], v[:, :, -1:])  # first decode step: the split
    query = torch.randn(b, hq, 1, d, generator=g)
    scale = 1 / math.sqrt(d)
    ctx = DecodeContext(0, scale, KeyBounds(), None, layer)
    out = Retrieval(n_sink=2, window=6, top_k=5).select(query, keys, ctx)
    assert isinstance(out, DecodeOutput)
    found = layer.exact_search(query[:, :, 0])
    off = layer.offloaded
    for h in range(hq):
        kv = h // (hq // hkv)
        union_pos = torch.cat([layer.positions[0], off.positions[0, found.indices[0, h]]])
        s = (k[0, kv, union_pos] @ query[0, h, 0]) * scale
        ref = torch.softmax(s, 0) @ v[0, kv, union_pos]
        torch.testing.assert_close(out.out[0, h, 0], ref, atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_full_coverage_equals_dense_with_padding_and_every_index(llama):
    ids, mask = left_padded(2, 50, [0, 9], seed=4)
    ref = llama(ids, attention_mask=mask).logits[:, -1]
    for index in ("exact", "query_ivf", "key_ivf"):
        cache, got = _prefill_and_step(llama, ids, mask, n_sink=2, window=3, top_k=1000, index=index,
                                       cluster_size=4, n_probe=1000)
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
        assert retrieval_report(cache)["cpu_tokens"] > 0


@torch.no_grad()
def test_report_gives_bytes_per_part_and_recall(llama):
    ids, mask = left_padded(1, 200, [0], seed=5)
    with attnpatch.patch_model(llama, decode="retrieval", n_sink=4, window=40, top_k=8, index="query_ivf",
                               cluster_size=8, n_probe=3, track_recall=True):
        out = llama.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True)
    rep = retrieval_report(out.past_key_values)
    assert rep["layers"] == llama.config.num_hidden_layers
    assert rep["gpu_fraction"] <= 0.25 and rep["gpu_bytes"] + 0 < rep["dense_bytes"]
    assert rep["cpu_tokens"] == rep["layers"] * (200 - 44) and rep["mean_retrieved"] == 8
    assert 0 < rep["recall"] <= 1 and rep["mean_scanned"] < 200 - 44


@torch.no_grad()
def test_a_multi_token_forward_after_the_split_is_refused(llama):
    ids, mask = left_padded(1, 30, [0], seed=6)
    cache, _ = _prefill_and_step(llama, ids, mask, n_sink=2, window=4)
    with attnpatch.patch_model(llama, decode="retrieval", n_sink=2, window=4), \
            pytest.raises(NotImplementedError, match="offloaded"):
        llama(ids[:, :3], **cache_arg(llama, cache), use_cache=True)


@pytest.mark.parametrize(("options", "allowed"), [({"top_k": 0}, ">= 1"), ({"index": "hnsw"}, "'exact'"),
                                                 ({"window": 0}, ">= 1"), ({"kmeans_iters": 101}, "<= 100")])
def test_bad_options_name_the_allowed_range(llama, options, allowed):
    with pytest.raises(ValueError, match=allowed):
        attnpatch.patch_model(llama, decode="retrieval", **options)


@torch.no_grad()
def test_a_one_token_first_forward_then_a_prompt_then_decoding(llama):
    """A first forward of one token (an empty cache: nothing to offload yet), then more prompt tokens, then a
    decode step that offloads: the same logits as dense decoding at full coverage."""
    ids = torch.randint(3, 256, (2, 30), generator=torch.Generator().manual_seed(3))
    dense = DynamicCache(config=llama.config)
    ref = [llama(part, **cache_arg(llama, dense), use_cache=True).logits[:, -1]
           for part in (ids[:, :1], ids[:, 1:-1], ids[:, -1:])]
    cache = DynamicCache(config=llama.config)
    with attnpatch.patch_model(llama, decode="retrieval", n_sink=2, window=4, top_k=1 << 20):
        out = [llama(part, **cache_arg(llama, cache), use_cache=True).logits[:, -1]
               for part in (ids[:, :1], ids[:, 1:-1], ids[:, -1:])]
    assert cache.layers[0].offloaded is not None  # the decode step split the cache
    for got, want in zip(out, ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_a_compiled_model_decodes_as_eager_with_graph_breaks_at_the_cpu_search(llama):
    """`torch.compile(model)` (not fullgraph: the step hands the query to the CPU search, a graph break)
    decodes what the eager model does, on retrieval's own dynamic cache, after the offload."""
    ids = torch.randint(3, 200, (2, 80), generator=torch.Generator().manual_seed(3))
    logits = {}
    with attnpatch.patch_model(llama, decode="retrieval", n_sink=4, window=8, top_k=16):
        for mode in ("eager", "compiled"):
            cache = DynamicCache(config=llama.config)
            forward = llama
            if mode == "compiled":
                torch._dynamo.reset()
                forward = torch.compile(llama, backend="eager")
            tok = llama(ids, **cache_arg(llama, cache)).logits[:, -1:].argmax(-1)
            steps = []
            for _ in range(3):
                steps.append(forward(input_ids=tok, **cache_arg(llama, cache)).logits[:, -1])
                tok = steps[-1].argmax(-1, keepdim=True)
            logits[mode] = torch.stack(steps)
            assert retrieval_report(cache)["cpu_tokens"] > 0
        torch._dynamo.reset()
    torch.testing.assert_close(logits["compiled"], logits["eager"], rtol=0, atol=1e-5)


@torch.no_grad()
def test_a_static_cache_generates_what_the_dynamic_one_does_holding_a_fixed_gpu_part(llama):
    """`generate(cache_implementation="static")` under `retrieval` (a part of the offloaded keys retrieved,
    left padding): the tokens of its dynamic cache; after the split each layer's GPU part is the kept
    tokens plus one slot per position the cache can still take, not `max_cache_len` slots."""
    from attnpatch.cache.retrieval_layer import StaticRetrievalLayer

    ids, mask = left_padded(2, 50, [0, 6], seed=4)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    options = dict(n_sink=3, window=5, top_k=6, index="exact")
    with attnpatch.patch_model(llama, decode="retrieval", **options):
        dynamic = llama.generate(ids, **kw)
        static = llama.generate(ids, cache_implementation="static", **kw)
    assert torch.equal(static.sequences, dynamic.sequences)
    cache = static.past_key_values
    room = cache.layers[0].max_cache_len - 50
    for layer in cache.layers:
        assert isinstance(layer, StaticRetrievalLayer) and layer.offloaded is not None
        assert layer.keys.shape[2] == 3 + 5 + room and int(layer.get_seq_length()) == 50 + 5
    report = retrieval_report(cache)
    assert report["gpu_tokens"] == len(cache.layers) * (8 + room)
    assert report["cpu_tokens"] == len(cache.layers) * (50 - 8)


def test_a_static_cache_without_room_for_a_generated_token_is_refused():
    from attnpatch.cache.retrieval_layer import StaticRetrievalLayer

    layer = StaticRetrievalLayer(10, 2, 3, 4, IndexConfig())
    k = torch.randn(1, 2, 10, 8)
    layer.update(k, k)
    with pytest.raises(ValueError, match="no slot left for a generated token"):
        layer.update(k[:, :, :1], k[:, :, :1])
    with pytest.raises(ValueError, match="holds 10 tokens per row"):
        StaticRetrievalLayer(10, 2, 3, 4, IndexConfig()).update(torch.randn(1, 2, 11, 8), torch.randn(1, 2, 11, 8))


@torch.no_grad()
@pytest.mark.parametrize("kind", ["static", "dynamic"])
def test_a_reset_cache_decodes_a_new_prompt_like_a_fresh_one(llama, kind):
    """`cache.reset()` after a generation: the next prompt is read and split again, as by a new cache."""
    from transformers.cache_utils import StaticCache

    def decode(cache, ids):
        kw = cache_arg(llama, cache)
        tok = llama(ids, **kw, use_cache=True).logits[:, -1:].argmax(-1)
        return torch.stack([llama(input_ids=tok, **kw, use_cache=True).logits[:, -1] for _ in range(2)])

    def new_cache():
        return StaticCache(config=llama.config, max_cache_len=48) if kind == "static" else \
            DynamicCache(config=llama.config)

    first, second = (torch.randint(3, 200, (1, 40), generator=torch.Generator().manual_seed(s)) for s in (5, 6))
    with attnpatch.patch_model(llama, decode="retrieval", n_sink=2, window=4, top_k=8):
        reused = new_cache()
        decode(reused, first)
        reused.reset()
        again = decode(reused, second)
        fresh = decode(new_cache(), second)
    assert reused.layers[0].offloaded.keys.shape[2] == 40 - 6
    torch.testing.assert_close(again, fresh, rtol=0, atol=0)
