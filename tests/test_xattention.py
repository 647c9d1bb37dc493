"""`xattention`: selection invariants (sink and diagonal, causal, padding, chunked prefill, ragged
lengths), the cumulative-mass rule per head against its definition, and runs through the patch."""

import pytest
import torch
from conftest import left_padded

import attnpatch
from attnpatch.estimators.antidiagonal import antidiagonal_block_scores
from attnpatch.methods.base import DenseFallback, PrefillContext
from attnpatch.methods.prefill.xattention import MassAfterSinkAndDiagonal, XAttention
from attnpatch.sparsity import KeyBounds
from attnpatch.sparsity.regions import allowed_blocks, forced_blocks

BOUNDS = {"plain": KeyBounds(), "left-padded": KeyBounds(key_start=torch.tensor([0, 37]))}


def _inputs(lq, lk, seed=0, hq=4, hkv=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, hq, lq, 16, generator=g), torch.randn(2, hkv, lk, 16, generator=g)


def _ctx(bounds):
    return PrefillContext(0, 0.25, bounds, None)


@pytest.mark.parametrize("name", list(BOUNDS))
@pytest.mark.parametrize("lq,lk", [(200, 200), (77, 203)], ids=["prefill", "chunked"])
def test_selection_invariants_and_per_head_threshold(name, lq, lk):
    bounds = BOUNDS[name]
    q, k = _inputs(lq, lk)
    taus = (0.0, 0.5, 0.9, 1.0)
    method = XAttention(threshold=taus, stride=4, block_size=16)
    sel = method.select(q, k, _ctx(bounds))
    sel.validate()
    mask = sel.to_block_mask()
    allowed = allowed_blocks(2, lq, lk, 16, 16, bounds)
    forced = forced_blocks(2, lq, lk, 16, 16, bounds, 1, 1) & allowed
    assert not (mask & ~allowed).any()  # causal and padding respected
    assert (mask | ~forced).all()  # sink (first real token) and diagonal always kept
    assert torch.equal(mask[:, 0], forced[:, 0])  # τ = 0: forced blocks only
    assert torch.equal(mask[:, 3], allowed[:, 0])  # τ = 1: every allowed block
    # every head keeps at least τ of each row's estimated mass, and no block it could have spared
    scores = antidiagonal_block_scores(q, k, 0.25, bounds, 16, 4)
    kept = (scores * mask).sum(-1)
    total = scores.sum(-1)
    for h, tau in enumerate(taus):
        assert (kept[:, h] >= tau * total[:, h] - 1e-5).all()
    # the selector alone keeps no block it could have spared (the sink and diagonal are counted first)
    picked = method.selector(scores, allowed, torch.tensor(taus))
    ends = torch.stack([allowed.int().argmax(-1), allowed.shape[-1] - 1 - allowed.flip(-1).int().argmax(-1)], -1)
    optional = picked & ~torch.zeros_like(picked).scatter(-1, ends.expand(-1, 4, -1, -1), True)
    lightest = torch.where(optional, scores, float("inf")).amin(-1)
    spare = (scores * picked).sum(-1) - lightest >= torch.tensor(taus).view(1, 4, 1) * total - 1e-6
    assert not (spare & optional.any(-1))[:, 1:3].any()


def test_selector_counts_the_forced_blocks_first():
    scores = torch.tensor([[[[0.30, 0.05, 0.25, 0.00, 0.40]]]])  # one row, five allowed blocks
    allowed = torch.ones(1, 1, 1, 5, dtype=torch.bool)
    pick = MassAfterSinkAndDiagonal("t")
    # forced: block 0 (0.30) and block 4 (0.40) hold 0.70; τ = 0.9 needs one more (block 2: 0.95)
    assert pick(scores, allowed, torch.tensor([0.9])).tolist() == [[[[True, False, True, False, True]]]]
    assert pick(scores, allowed, torch.tensor([0.7])).tolist() == [[[[True, False, False, False, True]]]]
    assert pick(scores, allowed, torch.tensor([1.0])).all()
    shifted = allowed.clone()
    shifted[..., :2] = False  # padding: the sink is the first allowed block
    assert pick(scores, shifted, torch.tensor([0.0])).tolist() == [[[[False, False, True, False, True]]]]


def test_gqa_runs_per_query_head_and_long_strides():
    q, k = _inputs(128, 128, seed=3, hq=6, hkv=2)
    sel = XAttention(threshold=0.6, stride=16, block_size=16).select(q, k, _ctx(KeyBounds()))
    sel.validate()
    assert sel.counts.shape == (2, 6, 8)


def test_short_inputs_run_dense():
    q, k = _inputs(32, 32)
    got = XAttention(block_size=16).select(q, k, _ctx(KeyBounds()))
    assert isinstance(got, DenseFallback) and "fits in the sink and diagonal" in got.reason


@torch.no_grad()
def test_through_the_patch_with_left_padding_and_per_head_thresholds(llama):
    ids, mask = left_padded(2, 200, [0, 29], seed=1)
    dense = llama(ids, attention_mask=mask).logits
    with attnpatch.patch_model(llama, method="xattention", block_size=16, stride=4,
                               threshold=(0.5, 0.7, 0.9, 0.95)) as patch:
        out = llama(ids, attention_mask=mask).logits
        stats = patch.stats()
    valid = mask.bool()
    assert torch.isfinite(out[valid]).all() and 0 < stats.density < 1
    assert (out[valid] - dense[valid]).abs().max() < 1.0  # sparse, but close on a tiny random model
    per_head = stats.layers[0]["density_per_head"]
    assert per_head[0] <= per_head[3]  # a larger τ keeps more
    with attnpatch.patch_model(llama, method="xattention", block_size=16, threshold=1.0):
        exact = llama(ids, attention_mask=mask).logits
    torch.testing.assert_close(exact[valid], dense[valid], atol=2e-5, rtol=1e-4)
