"""Token-level helpers (sparsity/tokens.py) against brute-force definitions on small inputs."""

import pytest
import torch

from attnpatch.sparsity import KeyBounds, TokenSelection, num_blocks
from attnpatch.sparsity.tokens import (
    CountedTokenSelection,
    block_key_mask,
    clip_lists,
    compact_mask,
    forced_key_mask,
    pad_lists,
    real_keys,
    validate_tokens,
    visible_pairs,
)

B, LQ, LK, BQ = 2, 37, 53, 8
BOUNDS = {
    "plain": KeyBounds(),
    "left-padded": KeyBounds(key_start=torch.tensor([0, 20])),
    "window": KeyBounds(window=9),
    "padded-window": KeyBounds(key_start=torch.tensor([3, 25]), window=12),
    "key-valid": KeyBounds(key_valid=torch.arange(LK).view(1, -1).remainder(torch.tensor([[5], [7]])) != 0),
}


def _brute_block_visible(bounds, lq=LQ, lk=LK, bq=BQ):
    """`[B, R, Lk]`: some query of the block may see the key (from the dense mask)."""
    dense = bounds.dense_mask(B, lq, lk)[:, 0]  # [B, Lq, Lk]
    r = num_blocks(lq, bq)
    dense = torch.nn.functional.pad(dense, (0, 0, 0, r * bq - lq)).view(B, r, bq, lk)
    return dense.any(2)


@pytest.mark.parametrize("name", list(BOUNDS))
@pytest.mark.parametrize("lq", [LQ, LK], ids=["chunked", "prefill"])
def test_block_key_mask_is_the_union_of_the_rows_masks(name, lq):
    bounds = BOUNDS[name]
    r = num_blocks(lq, BQ)
    got = block_key_mask(bounds, B, lq, LK, BQ, 0, r).expand(B, 1, r, LK)[:, 0]
    assert torch.equal(got, _brute_block_visible(bounds, lq))
    part = block_key_mask(bounds, B, lq, LK, BQ, 2, 4, keys=30).expand(B, 1, 2, 30)[:, 0]
    assert torch.equal(part, got[:, 2:4, :30])


def test_a_tensor_mask_is_clipped_by_its_closed_part():
    dense = BOUNDS["padded-window"].dense_mask(B, LQ, LK)
    got = block_key_mask(KeyBounds(mask=dense, window=12), B, LQ, LK, BQ, 0, num_blocks(LQ, BQ))
    assert torch.equal(got.expand(B, 1, -1, -1)[:, 0], _brute_block_visible(BOUNDS["padded-window"]))


@pytest.mark.parametrize("name", list(BOUNDS))
def test_forced_keys_are_sink_and_local_band(name):
    bounds = BOUNDS[name]
    r = num_blocks(LQ, BQ)
    got = forced_key_mask(bounds, B, LQ, LK, BQ, 0, r, sink_tokens=4, local_tokens=6).expand(B, 1, r, LK)[:, 0]
    first = bounds.first_key(B, "cpu")
    off = LK - LQ
    for b in range(B):
        for blk in range(r):
            f, last = off + blk * BQ, off + min((blk + 1) * BQ, LQ) - 1
            want = {j for j in range(LK) if first[b] <= j < first[b] + 4 or f - 6 <= j <= last}
            want = {j for j in want if _brute_block_visible(bounds)[b, blk, j]}
            assert set(got[b, blk].nonzero().flatten().tolist()) == want


def test_real_keys():
    assert real_keys(KeyBounds(window=4), B, LK) is None
    ks = real_keys(BOUNDS["left-padded"], B, LK)
    assert ks[0].all() and not ks[1, :20].any() and ks[1, 20:].all()
    assert torch.equal(real_keys(BOUNDS["key-valid"], B, LK), BOUNDS["key-valid"].key_valid)


def test_compact_mask_lists_true_positions_in_order():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(3, 4, 40, generator=g) < 0.3
    idx, counts = compact_mask(mask)
    assert idx.dtype == torch.int32 and idx.shape[-1] == int(mask.sum(-1).max())
    for row in range(12):
        m, i, c = mask.view(12, 40)[row], idx.view(12, -1)[row], counts.view(12)[row]
        assert c == m.sum() and i[:c].tolist() == m.nonzero().flatten().tolist() and (i[c:] == 0).all()
    idx5, counts5 = compact_mask(mask, width=5)  # entries past the width are dropped, lists stay ascending
    assert idx5.shape[-1] == 5 and torch.equal(counts5, counts.clamp(max=5))
    assert torch.equal(idx5, torch.where(torch.arange(5) < counts5.unsqueeze(-1), idx[..., :5], 0))


def test_pad_lists_concatenates_chunks():
    a = (torch.ones(1, 2, 3, 4, dtype=torch.int32), torch.full((1, 2, 3), 4, dtype=torch.int32))
    b = (torch.ones(1, 2, 1, 2, dtype=torch.int32), torch.full((1, 2, 1), 2, dtype=torch.int32))
    idx, counts = pad_lists([a, b])
    assert idx.shape == (1, 2, 4, 4) and counts.tolist() == [[[4, 4, 4, 2]] * 2] and (idx[:, :, 3, 2:] == 0).all()


@pytest.mark.parametrize("name", list(BOUNDS))
def test_clip_lists_keeps_exactly_the_visible_listed_keys(name):
    bounds = BOUNDS[name]
    r = num_blocks(LQ, BQ)
    g = torch.Generator().manual_seed(1)
    listed = torch.rand(B, 3, r, LK, generator=g) < 0.5
    idx, counts = compact_mask(listed)
    got_idx, got_counts = clip_lists(idx, counts, bounds, LQ, LK, BQ)
    want = listed & _brute_block_visible(bounds).unsqueeze(1)
    w_idx, w_counts = compact_mask(want)
    assert torch.equal(got_counts, w_counts)
    keep = torch.arange(got_idx.shape[-1]) < got_counts.unsqueeze(-1)
    assert torch.equal(torch.where(keep, got_idx, 0), w_idx[..., :got_idx.shape[-1]])


def test_counted_selection_counts_causal_pairs_exactly():
    lq, lk, bq = 21, 30, 8
    r = num_blocks(lq, bq)
    g = torch.Generator().manual_seed(2)
    off = lk - lq
    last = off + ((torch.arange(r) + 1) * bq).clamp(max=lq) - 1
    listed = (torch.rand(2, 3, r, lk, generator=g) < 0.6) & (torch.arange(lk) <= last.view(r, 1))
    idx, counts = compact_mask(listed)
    sel = CountedTokenSelection(idx, counts, bq, lq, lk)
    validate_tokens(sel)
    qpos = torch.arange(lq) + off
    rows = listed.repeat_interleave(bq, 2)[:, :, :lq]  # [B, H, Lq, Lk]
    want = (rows & (torch.arange(lk) <= qpos.view(-1, 1))).sum(dim=(0, 2, 3)).double()
    kept, total = sel.kept_and_total()
    assert torch.equal(kept, want) and torch.equal(total, TokenSelection(idx, counts, bq, lq, lk).kept_and_total()[1])
    assert torch.equal(visible_pairs(idx, counts, bq, lq, lk).sum(0), want)
    full = compact_mask((torch.arange(lk) <= last.view(r, 1)).expand(1, 1, r, lk))
    k_full, t_full = CountedTokenSelection(*full, bq, lq, lk).kept_and_total()
    assert torch.equal(k_full, t_full)  # every causal pair: density exactly 1


def test_validate_tokens_rejects_bad_lists():
    good = TokenSelection(torch.tensor([[[[0, 2, 5]]]], dtype=torch.int32), torch.tensor([[[3]]], dtype=torch.int32),
                          8, 8, 8)
    validate_tokens(good)
    for idx, msg in [([0, 2, 2], "ascending"), ([0, 2, 9], "after the last query"), ([-1, 2, 5], "negative")]:
        bad = TokenSelection(torch.tensor([[[idx]]], dtype=torch.int32), good.counts, 8, 8, 8)
        with pytest.raises(ValueError, match=msg):
            validate_tokens(bad)


@pytest.mark.parametrize("key_end", [[70, 96], [0, 17], [96]])
def test_all_pages_up_to_key_end_equals_clipping_them(key_end):
    from attnpatch.sparsity import PageSelection

    end = torch.tensor(key_end)
    short = PageSelection.all_pages(2, 3, 96, 16, key_end=end)
    clipped = PageSelection.all_pages(2, 3, 96, 16).clipped(end)
    assert torch.equal(short.counts, clipped.counts.expand(2, 3))
    assert torch.equal(short.indices, clipped.indices) and short.kv_len == clipped.kv_len == 96
