"""`recycled`: the refresh schedule, what a refresh keeps (page mass from the step's probabilities,
sinks, no padding pages), equality with dense when the recycled set covers the cache, padded batches
on the reference path, and option validation."""

import pytest
import torch
from conftest import cache_arg, left_padded
from transformers import DynamicCache, StaticCache

import attnpatch
from attnpatch.cache import RecycledLayer, StaticRecycledLayer
from attnpatch.estimators.page_lse import page_lse_torch

PS = 16
pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")


def _generate(model, ids, mask, cache, new, **options):
    with attnpatch.patch_model(model, decode="recycled", page_size=PS, **options) as patch:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             pad_token_id=0, output_scores=True, return_dict_in_generate=True,
                             **cache_arg(model, cache))
        return out, patch.stats()


@torch.no_grad()
@pytest.mark.parametrize("stride", [1, 3, 4])
def test_full_attention_every_stride_steps(llama, stride):
    ids, mask = left_padded(2, 50, [0, 5], seed=1)
    cache = DynamicCache(config=llama.config)
    steps = 10  # decode steps: generate 11 tokens (the first comes from the prefill)
    _, stats = _generate(llama, ids, mask, cache, steps + 1, budget=48, stride=stride)
    refreshes = -(-steps // stride)
    for layer, d in zip(cache.layers, stats.layers, strict=True):
        assert isinstance(layer, RecycledLayer) and layer.refreshes == refreshes
        assert d["backends"].get("decode: sdpa", 0) == refreshes  # a refresh step runs dense attention
        assert d["backends"].get("decode: reference", 0) == steps - refreshes
        assert layer.refresh_length == 50 + 1 + (refreshes - 1) * stride


@torch.no_grad()
def test_equals_dense_when_the_recycled_pages_cover_the_cache(llama):
    """Refreshes at cache lengths ≤ budget keep every page; the steps between read those pages and
    the new tokens' pages through the sparse path (not SDPA), and equal dense attention."""
    ids, mask = left_padded(2, 40, [0, 9], seed=2)
    kw = dict(attention_mask=mask, max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0,
              output_scores=True, return_dict_in_generate=True)
    dense = llama.generate(ids, **kw)
    out, stats = _generate(llama, ids, mask, None, 20, budget=64, stride=8)
    assert stats.backends["decode: reference"] > 0
    assert torch.equal(out.sequences, dense.sequences)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(dense.scores), atol=2e-5, rtol=1e-4)


def test_page_lse_softmaxed_is_the_group_summed_attention_probability_per_page():
    """What a refresh ranks by: each head's per-page log-sum-exp, softmaxed over the pages, summed over
    the KV group = the step's attention probabilities summed per page and group."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 1, 8, generator=g), torch.randn(2, 2, 40, 8, generator=g)
    visible = torch.ones(2, 40, dtype=torch.bool)
    visible[1, :20] = False
    mass = torch.softmax(page_lse_torch(q, k, PS, 0.3, visible), -1).sum(2)
    probs = torch.softmax((q @ k.repeat_interleave(2, 1).transpose(-1, -2)).squeeze(2) * 0.3
                          + torch.where(visible, 0.0, float("-inf")).unsqueeze(1), -1)  # [B, Hq, L]
    per_page = torch.nn.functional.pad(probs, (0, 8)).view(2, 4, 3, PS).sum(-1).view(2, 2, 2, 3).sum(2)
    torch.testing.assert_close(mass, per_page)
    assert mass[1, :, 0].eq(0).all()


@torch.no_grad()
@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_refresh_keeps_sinks_and_budget_and_never_pure_padding_pages(llama, cache_kind):
    ids, mask = left_padded(2, 100, [0, 40], seed=3)  # row 1: pages 0, 1 are padding only
    cache = DynamicCache(config=llama.config) if cache_kind == "dynamic" else \
        StaticCache(config=llama.config, max_cache_len=110)
    _generate(llama, ids, mask, cache, 3, budget=48, stride=100)
    for layer in cache.layers:
        assert isinstance(layer, RecycledLayer if cache_kind == "dynamic" else StaticRecycledLayer)
        assert layer.refreshes == 1 and layer.counts.eq(3).all()
        for h in range(layer.pages.shape[1]):
            row0, row1 = layer.pages[0, h].tolist(), layer.pages[1, h].tolist()
            last = 100 // PS  # the refresh query (position 100) is on page 6
            assert 0 in row0 and last in row0 and 2 in row1 and last in row1  # row 1's first real key: 40
            assert min(row1) >= 2


@torch.no_grad()
def test_static_cache_equals_dynamic(llama):
    ids, mask = left_padded(2, 70, [0, 11], seed=5)
    dyn, _ = _generate(llama, ids, mask, DynamicCache(config=llama.config), 8, budget=48, stride=3)
    sta, _ = _generate(llama, ids, mask, StaticCache(config=llama.config, max_cache_len=80), 8, budget=48, stride=3)
    assert torch.equal(dyn.sequences, sta.sequences)
    torch.testing.assert_close(torch.stack(dyn.scores), torch.stack(sta.scores), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(("options", "page_size"), [({"budget": 256}, 32), ({"budget": 384}, 32), ({"budget": 512}, 64),
                                                    ({}, 64), ({"budget": 256, "page_size": 64}, 64),
                                                    ({"budget": 1024, "page_size": 16}, 16)])
def test_default_page_size_keeps_eight_pages_in_small_budgets(options, page_size):
    """`page_size=0` (the default): 64-token pages, or 32 where the budget holds fewer than 8 pages of 64
    (1/16 of SmolLM2's 4K: niah_single_1 0.96 at 64, 1.00 at 32 over 100 prompts); a given size is kept."""
    from attnpatch.methods.decode.recycled import Recycled

    assert Recycled(**options).page_size == page_size


def test_bad_options_are_rejected_with_the_allowed_range(llama):
    with pytest.raises(ValueError, match=r"multiple of page_size \(64\) of at least 192"):
        attnpatch.patch_model(llama, decode="recycled", budget=100)
    with pytest.raises(ValueError, match="stride.*>= 1"):
        attnpatch.patch_model(llama, decode="recycled", stride=0)


@pytest.mark.parametrize(("refresh_at", "written", "stride"),
                         [(100, 101, 16), (96, 111, 16), (100, 140, 40), (65, 66, 1)])
def test_recycled_list_is_the_ascending_union_of_kept_and_new_pages(refresh_at, written, stride):
    """A recycled step's list, built without a sort: the pages a refresh kept (always with the refresh's
    current page) and every page written since, ascending, each once; entries past the count unread."""
    from attnpatch.methods.decode.recycled import Recycled

    m = Recycled(budget=64, page_size=PS, stride=stride)
    current = (refresh_at - 1) // PS
    kept = [[0, 2, current], [1, current, 0]]  # row 1 kept 2 pages (counts 2; its last entry is unused)
    pages = torch.tensor([[row, row] for row in kept])  # [B=2, Hkv=2, 3]
    counts = torch.tensor([[3, 3], [2, 2]])
    sel = m._recycled_pages(pages, counts, refresh_at, written, 256)
    for b in range(2):
        for h in range(2):
            got = sel.indices[b, h, :sel.counts[b, h]].tolist()
            want = sorted(set(kept[b][:counts[b, h]]) | set(range(refresh_at // PS, (written - 1) // PS + 1)))
            assert got == want
