"""`quest`: page min / max kept incrementally by the cache layers (dynamic and static), the page
selection (size, forced pages, bound), static-cache generation, and option validation."""

import pytest
import torch
from conftest import cache_arg, left_padded, random_ids
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import StaticLayer

import attnpatch
from attnpatch.backends import BACKENDS, BackendPlan
from attnpatch.backends.reference.backend import ReferenceBackend
from attnpatch.cache import PageBoundsLayer, StaticPageBoundsLayer, key_page_bounds
from attnpatch.estimators.page_bounds import page_upper_bounds
from attnpatch.methods.base import DecodeContext
from attnpatch.methods.decode.quest import Quest
from attnpatch.sparsity import KeyBounds

PS = 16
pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")


def _layer(kind: str):
    return PageBoundsLayer(PS) if kind == "dynamic" else StaticPageBoundsLayer(200, PS)


def _fill(layer, chunks, seed=0, b=2, h=2, d=8):
    g = torch.Generator().manual_seed(seed)
    for n in chunks:
        k = torch.randn(b, h, n, d, generator=g)
        layer.update(k, torch.randn(b, h, n, d, generator=g))


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_page_bounds_equal_a_recomputation_after_prefill_and_decode_steps(kind):
    layer = _layer(kind)
    written = 0
    for chunks in ([37], [1] * 20, [5, 3], [1] * 9):  # prefill, decode steps, chunks starting mid-page
        _fill(layer, chunks, seed=written)
        written += sum(chunks)
        page_min, page_max, n = layer.page_bounds()
        assert int(n) == written
        lo, hi = key_page_bounds(layer.keys, PS, written)
        pages = lo.shape[2]
        assert torch.equal(page_min[:, :, :pages], lo) and torch.equal(page_max[:, :, :pages], hi)
    # the one-launch kernel's barrier counters: made with the layer (outside any CUDA-graph pool), zero
    assert layer.counters.dtype == torch.int32 and layer.counters.shape == (2 * 2 * 2,) and not layer.counters.any()


def test_the_one_launch_path_needs_the_cache_layers_counters(monkeypatch):
    """Without barrier counters from the cache layer (a buffer first made inside a compiled step would sit in
    its CUDA-graph pool, which inductor refuses: measured on an H100) the Triton backend declines the
    one-launch step, naming why; turned off (`ATTNPATCH_BOUND_DECODE_CONFIG=off`), it says so first."""
    from attnpatch.backends.triton.backend import TritonBackend
    from attnpatch.sparsity import BoundPages

    q, k = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 64, 8)
    lo, hi = key_page_bounds(k, PS)
    pages = BoundPages(q, lo, hi, 4, 2, torch.zeros(1, dtype=torch.long), torch.tensor(4), 0, "softmax_sum", PS, 64,
                       0.3)
    monkeypatch.setenv("ATTNPATCH_BOUND_DECODE_CONFIG", "auto")
    assert "no barrier counters from the cache layer" in TritonBackend().decode_bound_reason(
        q, k, k, pages, KeyBounds())
    monkeypatch.setenv("ATTNPATCH_BOUND_DECODE_CONFIG", "off")
    assert "the one-launch kernel is off" in TritonBackend().decode_bound_reason(q, k, k, pages, KeyBounds())


def test_static_page_bounds_restart_after_reset_and_crop():
    layer = StaticPageBoundsLayer(96, PS)
    _fill(layer, [50, 1, 1])
    if hasattr(StaticLayer, "crop"):  # transformers 5.17's StaticLayer has no crop
        layer.crop(-7)
        _fill(layer, [1, 1, 2], seed=1)
        lo, hi = key_page_bounds(layer.keys, PS, 49)
        assert torch.equal(layer.page_min[:, :, :4], lo) and torch.equal(layer.page_max[:, :, :4], hi)
    layer.reset()
    _fill(layer, [20], seed=2)
    lo, hi = key_page_bounds(layer.keys, PS, 20)
    assert torch.equal(layer.page_min[:, :, :2], lo) and torch.equal(layer.page_max[:, :, :2], hi)


def test_bound_is_an_upper_bound_of_every_key_score():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 1, 8, generator=g), torch.randn(2, 2, 70, 8, generator=g)
    lo, hi = key_page_bounds(k, PS)
    bound = page_upper_bounds(q, lo, hi)  # [B, Hkv, G, pages]
    scores = q.view(2, 2, 2, 8) @ k.transpose(-1, -2)  # [B, Hkv, G, L]
    pages = torch.nn.functional.pad(scores, (0, 80 - 70), value=float("-inf")).view(2, 2, 2, 5, PS).amax(-1)
    assert (pages <= bound + 1e-5).all()
    explicit = torch.maximum(q.view(2, 2, 2, 1, 8) * lo.unsqueeze(2), q.view(2, 2, 2, 1, 8) * hi.unsqueeze(2)).sum(-1)
    torch.testing.assert_close(bound, explicit)


@pytest.mark.parametrize("kind", ["dynamic", "static"])
@pytest.mark.parametrize("group", ["max", "mass"])
def test_selection_keeps_budget_pages_with_first_and_last(kind, group):
    """Every (row, KV head) lists exactly budget / page_size distinct ascending pages, among them the
    row's first real page (left padding: row 1 starts at key 40) and the current page; no page before
    the row's first real key or past the written length."""
    layer = _layer(kind)
    _fill(layer, [100] + [1] * 5)
    written, k = 105, 4
    keys = layer.keys
    q = torch.randn(2, 4, 1, 8)
    bounds = KeyBounds(key_start=torch.tensor([0, 40]))
    method = Quest(budget=k * PS, page_size=PS, group=group, dense_layers=0)
    sel = method.select(q, keys, DecodeContext(3, 8 ** -0.5, bounds, None, layer))
    assert sel.counts.eq(k).all() and sel.kv_len == keys.shape[2]
    last = (written - 1) // PS
    for b, first in enumerate((0, 40 // PS)):
        for h in range(2):
            pages = sel.indices[b, h].tolist()
            assert pages == sorted(set(pages)) and first in pages and last in pages
            assert all(first <= p <= last for p in pages)
    # the chosen (non-forced) pages are the best by the bound, as computed without the cache's metadata
    lo, hi = key_page_bounds(keys, PS, written)
    bound = page_upper_bounds(q, lo, hi)[0, 0].amax(0) if group == "max" else None
    if bound is not None:
        free = [p for p in range(1, last) if p not in (0, last)]
        best = sorted(free, key=lambda p: -bound[p])[: k - 2]
        assert set(sel.indices[0, 0].tolist()) == {0, last, *best}


def test_budget_covering_the_cache_or_dense_layers_run_dense():
    layer = _layer("dynamic")
    _fill(layer, [60])
    q, bounds = torch.randn(2, 4, 1, 8), KeyBounds()
    assert Quest(budget=64, page_size=PS, dense_layers=0).select(
        q, layer.keys, DecodeContext(0, 1.0, bounds, None, layer)) is None
    assert Quest(budget=48, page_size=PS, dense_layers=2).select(
        q, layer.keys, DecodeContext(1, 1.0, bounds, None, layer)) is None
    assert Quest(budget=48, page_size=PS, dense_layers=0, min_length=61).select(
        q, layer.keys, DecodeContext(2, 1.0, bounds, None, layer)) is None
    assert Quest(budget=48, page_size=PS, dense_layers=0).select(
        q, layer.keys, DecodeContext(2, 1.0, bounds, None, layer)) is not None


def _scores(model, ids, mask, cache=None, **kw):
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                         output_scores=True, return_dict_in_generate=True, **cache_arg(model, cache), **kw)
    return out.sequences, torch.stack(out.scores)


@torch.no_grad()
def test_static_cache_generate_equals_dense_at_full_density_and_dynamic_when_sparse(llama):
    ids, mask = left_padded(2, 70, [0, 20], seed=4)
    dense_seq, dense = _scores(llama, ids, mask, cache_implementation="static")
    with attnpatch.patch_model(llama, decode="quest", budget=1 << 30, page_size=PS, dense_layers=0):
        seq, full = _scores(llama, ids, mask, cache_implementation="static")
    assert torch.equal(seq, dense_seq)
    torch.testing.assert_close(full, dense, atol=2e-5, rtol=1e-4)
    with attnpatch.patch_model(llama, decode="quest", budget=48, page_size=PS, dense_layers=0) as patch:
        static = StaticCache(config=llama.config, max_cache_len=80)
        s_seq, s_scores = _scores(llama, ids, mask, static)
        d_seq, d_scores = _scores(llama, ids, mask, DynamicCache(config=llama.config))
        stats = patch.stats()
    assert all(isinstance(layer, StaticPageBoundsLayer) for layer in static.layers)
    assert torch.equal(s_seq, d_seq)
    torch.testing.assert_close(s_scores, d_scores, atol=2e-5, rtol=1e-4)
    d = stats.layers[0]
    assert d["decode_budget"] == 48 and 0 < d["decode_density"] < 1
    assert d["decode_pages_read"] == 2 * 5 * 2 * 2 * 3  # (static + dynamic) × 5 steps × B × Hkv × 3 pages


def test_bad_budgets_are_rejected_with_the_allowed_range(llama):
    for budget, page, words in ((50, 16, "multiple of page_size (16)"), (64, 32, "at least 96"), (32, 16, ">= 48")):
        with pytest.raises(ValueError, match="budget") as err:
            attnpatch.patch_model(llama, decode="quest", budget=budget, page_size=page)
        assert words in str(err.value)
    with pytest.raises(ValueError, match="at least 384"):
        attnpatch.patch_model(llama, decode="quest", budget=256, page_size=128)
    with pytest.raises(ValueError, match="page_size"):
        attnpatch.patch_model(llama, decode="quest", page_size=8)


@torch.no_grad()
def test_streaming_on_a_static_cache_keeps_every_token_and_says_so(llama):
    """A static cache cannot evict: streaming keeps its default layers there (the stats say why) and reads
    the sinks + window of them at every step."""
    with attnpatch.patch_model(llama, decode="streaming", window=8) as patch:
        llama.generate(random_ids(1, 40), max_new_tokens=3, do_sample=False, cache_implementation="static")
        stats = patch.stats()
    assert any("cannot evict" in note for note in stats.layers[0]["notes"])
    assert stats.backends["decode: sink-window gather"] == 2 * len(stats.layers)


def test_local_pages_are_always_kept():
    layer = _layer("dynamic")
    _fill(layer, [150])
    q = torch.randn(2, 4, 1, 8)
    sel = Quest(budget=6 * PS, page_size=PS, local_pages=2, dense_layers=0).select(
        q, layer.keys, DecodeContext(0, 1.0, KeyBounds(), None, layer))
    assert sel.counts.eq(6).all()
    for pages in sel.indices.view(-1, 6).tolist():
        assert {0, 7, 8, 9} <= set(pages)
    with pytest.raises(ValueError, match="at least 80 tokens .*2 local page"):
        Quest(budget=64, page_size=PS, local_pages=2)


class _FastDecode(ReferenceBackend):
    """Stands in for the Triton decode kernel: the exact reference under another name."""

    name = "stand-in fast decode"


def _decode_backends(layer: dict) -> dict:
    return {k: v for k, v in layer["backends"].items() if k.startswith("decode")}


@torch.no_grad()
def test_declined_steps_run_the_fast_dense_decode_not_sdpa(llama, monkeypatch):
    """Quest's dense layers (and any step a sparse decode method declines) go to the first fast decode
    backend over every page; the `dense` method keeps transformers' SDPA."""
    monkeypatch.setitem(BACKENDS, _FastDecode.name, _FastDecode())
    ids, mask = left_padded(2, 70, [0, 20], seed=5)
    dense_seq, dense = _scores(llama, ids, mask, cache_implementation="static")
    for cache in ("static", "dynamic"):
        with attnpatch.patch_model(llama, decode="quest", budget=48, page_size=PS, dense_layers=1) as patch:
            patch.state.backends = BackendPlan(("reference",), (_FastDecode.name, "reference"))
            kw = {"cache_implementation": "static"} if cache == "static" else {}
            seq, _ = _scores(llama, ids, mask, **kw)
            layers = patch.stats().layers
        for d in layers[:2]:  # layer 0: declined (dense layer); layer 1: its chosen pages
            assert _decode_backends(d) == {f"decode: {_FastDecode.name}": 5}, cache
    with attnpatch.patch_model(llama, decode="quest", budget=1 << 30, page_size=PS, dense_layers=2) as patch:
        patch.state.backends = BackendPlan(("reference",), (_FastDecode.name, "reference"))
        seq, full = _scores(llama, ids, mask, cache_implementation="static")
        layers = patch.stats().layers
    assert all(set(_decode_backends(d)) == {f"decode: {_FastDecode.name}"} for d in layers)
    assert torch.equal(seq, dense_seq)
    torch.testing.assert_close(full, dense, atol=2e-5, rtol=1e-4)
    with attnpatch.patch_model(llama, decode="dense") as patch:
        patch.state.backends = BackendPlan(("reference",), (_FastDecode.name, "reference"))
        _scores(llama, ids, mask, cache_implementation="static")
        layers = patch.stats().layers
    assert all(set(_decode_backends(d)) == {"decode: sdpa"} for d in layers)
