"""`vertical_slash`: the block selection contains MInference's token pattern (written out here from the
full attention) and adds no block without a pattern token beyond the forced ones; per-head sizes;
padding, chunked prefill; dense fallbacks; through the patch."""

import pytest
import torch
from conftest import left_padded

import attnpatch
from attnpatch.methods.base import DenseFallback, PrefillContext
from attnpatch.methods.prefill.vertical_slash import VerticalSlash
from attnpatch.sparsity import KeyBounds, num_blocks
from attnpatch.sparsity.regions import allowed_blocks, forced_blocks

B, HQ, HKV, D, BS = 2, 4, 2, 16, 16
BOUNDS = {"plain": KeyBounds(), "left-padded": KeyBounds(key_start=torch.tensor([0, 37]))}


def _inputs(lq, lk, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, HQ, lq, D, generator=g), torch.randn(B, HKV, lk, D, generator=g)


def minference_pattern(q, k, scale, bounds, n, v_size, s_size, sink, local):
    """[B, Hq, Lq, Lk] bool: MInference's online vertical-slash token pattern, from the full attention."""
    lq, lk = q.shape[2], k.shape[2]
    visible = bounds.dense_mask(B, lq, lk)
    s = q @ k.repeat_interleave(HQ // HKV, 1).transpose(-1, -2) * scale
    p = torch.softmax(s.masked_fill(~visible, float("-inf")), -1).nan_to_num(0.0)[:, :, -n:]
    vertical = p.sum(-2)
    key_of = (torch.arange(lk - n, lk).view(-1, 1) - torch.arange(lk).view(1, -1))  # [n, offset] -> key
    slash = (p.gather(-1, key_of.clamp(min=0).expand(B, HQ, -1, -1)) * (key_of >= 0)).sum(-2)
    start = bounds.first_key(B, "cpu")
    out = torch.zeros(B, HQ, lq, lk, dtype=torch.bool)
    qpos = torch.arange(lq).view(-1, 1) + lk - lq
    offset = qpos - torch.arange(lk).view(1, -1)
    for b in range(B):
        vb = vertical[b].clone()
        vb[:, start[b]:start[b] + sink] = float("inf")
        sb = slash[b].clone()
        sb[:, :local] = float("inf")
        for h in range(HQ):
            cols = torch.topk(vb[h], min(lk, max(v_size, sink))).indices
            cols = cols[vb[h, cols] > 0]
            diags = torch.topk(sb[h], min(lk, max(s_size, local))).indices
            diags = diags[sb[h, diags] > 0]
            on_diag = torch.isin(offset, diags)
            out[b, h] = on_diag.clone()
            out[b, h][:, cols] = True
    return out & visible


def _blocks_of(tokens, lq, lk):
    r, c = num_blocks(lq, BS), num_blocks(lk, BS)
    padded = torch.nn.functional.pad(tokens, (0, c * BS - lk, 0, r * BS - lq))
    return padded.view(B, HQ, r, BS, c, BS).any(dim=(3, 5))


@pytest.mark.parametrize("name", list(BOUNDS))
@pytest.mark.parametrize("lq,lk", [(200, 200), (77, 203)], ids=["prefill", "chunked"])
def test_selection_contains_the_token_pattern_and_nothing_else(name, lq, lk):
    bounds = BOUNDS[name]
    q, k = _inputs(lq, lk)
    method = VerticalSlash(vertical_size=12, slash_size=20, last_queries=24, sink_columns=5, local_diagonals=10,
                           block_size=BS)
    sel = method.select(q, k, PrefillContext(0, 0.25, bounds, None))
    sel.validate()
    mask = sel.to_block_mask()
    pattern = minference_pattern(q, k, 0.25, bounds, 24, 12, 20, 5, 10)
    holds = _blocks_of(pattern, lq, lk)
    allowed = allowed_blocks(B, lq, lk, BS, BS, bounds)
    forced = forced_blocks(B, lq, lk, BS, BS, bounds, 1, 1) & allowed
    assert (mask | ~holds).all()  # a superset of MInference's token pattern
    assert not (mask & ~holds & ~forced).any()  # every other kept block holds a pattern token
    assert not (mask & ~allowed).any() and (mask | ~forced).all()
    assert 0 < sel.density_per_head().max() < 1


def test_per_head_sizes_select_as_each_head_alone():
    q, k = _inputs(160, 160, seed=1)
    ctx = PrefillContext(0, 0.25, KeyBounds(), None)
    sizes = (4, 8, 30, 60)
    per_head = VerticalSlash(vertical_size=sizes, slash_size=tuple(2 * s for s in sizes), local_diagonals=4,
                             sink_columns=2, block_size=BS).select(q, k, ctx).to_block_mask()
    for h, s in enumerate(sizes):
        alone = VerticalSlash(vertical_size=s, slash_size=2 * s, local_diagonals=4, sink_columns=2,
                              block_size=BS).select(q, k, ctx).to_block_mask()
        assert torch.equal(per_head[:, h], alone[:, h])


def test_short_inputs_cap_the_sizes_or_run_dense():
    q, k = _inputs(150, 150)
    ctx = PrefillContext(0, 0.25, KeyBounds(), None)
    # default sizes (1000, 6096) on 150 keys: capped at half the input (75 columns and diagonals)
    capped = VerticalSlash(block_size=BS).select(q, k, ctx)
    assert not isinstance(capped, DenseFallback)
    exact = VerticalSlash(block_size=BS, vertical_size=75, slash_size=75, local_diagonals=75, sink_columns=30)
    assert torch.equal(exact.select(q, k, ctx).to_block_mask(), capped.to_block_mask())
    for kw, why in [({"max_share": 1.0}, "vertical_size covers"), ({"max_share": 1.0, "vertical_size": 10},
                    "slash_size covers"), ({"block_size": 128}, "fits in the sink and diagonal")]:
        got = VerticalSlash(**kw).select(q, k, ctx)
        assert isinstance(got, DenseFallback) and why in got.reason
    kept = VerticalSlash(vertical_size=10, slash_size=149, local_diagonals=0, max_share=1.0,
                         block_size=BS).select(q, k, ctx)
    assert torch.equal(kept.to_block_mask(), allowed_blocks(B, 150, 150, BS, BS, KeyBounds()).expand(B, HQ, -1, -1))


@torch.no_grad()
def test_through_the_patch_with_left_padding():
    from attnpatch.testing import tiny_model

    model = tiny_model("qwen3")
    ids, mask = left_padded(2, 300, [0, 37], seed=3)
    dense = model(ids, attention_mask=mask).logits
    with attnpatch.patch_model(model, method="vertical_slash", block_size=BS, vertical_size=(8, 16, 24, 32),
                               slash_size=32, local_diagonals=16, sink_columns=8) as patch:
        out = model(ids, attention_mask=mask).logits
        stats = patch.stats()
    valid = mask.bool()
    assert torch.isfinite(out[valid]).all() and 0 < stats.density < 1 and not stats.dense_fallbacks
    assert (out[valid] - dense[valid]).abs().max() < 1.0
