"""The shared pieces of every prefill method, against brute-force definitions over tokens: allowed and
forced regions, the selectors, and the one full/partial split executors use."""

import pytest
import torch

from attnpatch.sparsity import BlockSelection, KeyBounds, num_blocks
from attnpatch.sparsity.regions import allowed_blocks, forced_blocks
from attnpatch.sparsity.selectors import CumulativeMass, Threshold, TopK
from attnpatch.sparsity.split import classify_slots, compact, mask_free_prefix

# (q_len, kv_len, block_q, block_k, bounds)
CASES = [
    (64, 64, 16, 16, KeyBounds()),
    (37, 101, 16, 16, KeyBounds(key_start=torch.tensor([0, 21]))),
    (100, 100, 32, 16, KeyBounds(window=24)),
    (50, 130, 16, 32, KeyBounds(key_start=torch.tensor([3, 90]), window=40)),
    (70, 70, 16, 16, KeyBounds(key_valid=torch.arange(70)[None, :] < torch.tensor([[70], [52]]))),
]
IDS = ["plain", "chunked-padded", "window", "chunked-window-padded", "right-padded"]


def _visible(lq, lk, bounds, batch=2):
    """[B, Lq, Lk] token visibility from the definition."""
    return bounds.dense_mask(batch, lq, lk)[:, 0]


def _block_any_all(vis, bq, bk):
    """Per (b, query block, key block): some visible pair / every pair of real rows and keys visible
    (a block reaching past Lk is never full)."""
    b, lq, lk = vis.shape
    r, c = num_blocks(lq, bq), num_blocks(lk, bk)
    pad = torch.zeros(b, r * bq, c * bk, dtype=torch.bool)
    pad[:, :lq, :lk] = vis
    blocks = pad.view(b, r, bq, c, bk)
    any_ = blocks.any(-1).any(2)
    real_row = (torch.arange(r * bq) < lq).view(1, r, bq, 1, 1)
    full = (blocks | ~real_row).all(-1).all(2)
    complete = (torch.arange(c) + 1) * bk <= lk
    return any_, full & complete & any_


@pytest.mark.parametrize("lq,lk,bq,bk,bounds", CASES, ids=IDS)
def test_allowed_blocks_are_exactly_the_blocks_with_a_visible_pair(lq, lk, bq, bk, bounds):
    any_, _ = _block_any_all(_visible(lq, lk, bounds), bq, bk)
    assert torch.equal(allowed_blocks(2, lq, lk, bq, bk, bounds)[:, 0], any_)


@pytest.mark.parametrize("lq,lk,bq,bk,bounds", CASES, ids=IDS)
def test_split_matches_the_definition(lq, lk, bq, bk, bounds):
    any_, full = _block_any_all(_visible(lq, lk, bounds), bq, bk)
    c = num_blocks(lk, bk)
    sel = BlockSelection.causal(2, 3, lq, lk, bq, bk)
    idx = torch.arange(c).expand(2, 3, num_blocks(lq, bq), c).contiguous()  # every block listed
    visible, fullslots = classify_slots(idx, torch.full(idx.shape[:3], c), bq, bk, lq, lk, bounds)
    assert torch.equal(visible, any_[:, None].expand_as(visible))
    assert torch.equal(fullslots, full[:, None].expand_as(fullslots))
    prefix = mask_free_prefix(sel.indices, sel.counts, bq, bk, lq, lk, bounds)
    lead = torch.cumprod(full.int(), -1).sum(-1)
    assert torch.equal(prefix, torch.minimum(lead[:, None].expand_as(prefix), sel.counts).int())


def test_compact_keeps_order_and_counts():
    idx = torch.tensor([[3, 5, 7, 9, 11]])
    flag = torch.tensor([[False, True, False, True, True]])
    counts, lists = compact(idx, flag, 3)
    assert counts.tolist() == [3] and lists.tolist() == [[5, 9, 11]]
    counts, lists = compact(idx, flag, 7)
    assert lists[0, :3].tolist() == [5, 9, 11] and lists.shape[-1] == 7


def test_forced_sink_starts_at_the_first_real_token_and_the_local_band_ends_at_the_diagonal():
    lq = lk = 96
    bounds = KeyBounds(key_start=torch.tensor([0, 40]), window=32)
    forced = forced_blocks(2, lq, lk, 16, 16, bounds, sink_blocks=1, local_blocks=2)[:, 0]
    r = torch.arange(6)
    # 40..55 spans key blocks 2 and 3 (kept from the query blocks that reach them causally)
    assert forced[0, :, 0].all() and forced[1, 2:, 2].all() and forced[1, 3:, 3].all()
    assert not forced[1, 2:, 0].any()  # padding is not a sink (block 0 is only in the first rows' local band)
    diag = forced[0, r, r]
    assert diag.all() and forced[0, r[1:], r[1:] - 1].all()


def test_selectors_honour_per_head_parameters():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(2, 3, 4, 10, generator=g)
    allowed = torch.ones(2, 1, 4, 10, dtype=torch.bool)
    allowed[..., 8:] = False
    keep = TopK("budget")(scores, allowed, torch.tensor([1.0, 3.0, 20.0]))
    assert keep.sum(-1)[:, 0].eq(1).all() and keep.sum(-1)[:, 1].eq(3).all() and keep.sum(-1)[:, 2].eq(8).all()
    assert not keep[..., 8:].any()
    top = scores.masked_fill(~allowed, -1).argmax(-1, keepdim=True)
    assert keep[:, 0].gather(-1, top[:, 0]).all()  # the best block is the one kept
    frac = TopK("budget", fraction=True)(scores, allowed, torch.tensor([0.25, 0.5, 1.0]))
    assert frac.sum(-1)[:, 0].eq(2).all() and frac.sum(-1)[:, 2].eq(8).all()
    mass = CumulativeMass("threshold")(scores, allowed, torch.tensor([0.0, 0.5, 1.0]))
    kept_mass = (scores * mass).sum(-1) / (scores * allowed).sum(-1)
    assert (kept_mass[:, 1] >= 0.5).all() and mass[:, 2].eq(allowed[:, 0]).all() and mass[:, 0].sum() == 0
    # minimal: dropping the smallest kept block goes below the threshold
    smallest = torch.where(mass[:, 1], scores[:, 1], 9).amin(-1)
    assert ((kept_mass[:, 1] * (scores[:, 1] * allowed[:, 0]).sum(-1) - smallest)
            / (scores[:, 1] * allowed[:, 0]).sum(-1) < 0.5).all()
    thr = Threshold("threshold")(scores, allowed, torch.tensor([0.0, 0.5, 2.0]))
    assert thr[:, 0].eq(allowed[:, 0]).all() and thr[:, 2].sum() == 0
    assert torch.equal(thr[:, 1], (scores[:, 1] >= 0.5) & allowed[:, 0])
