"""FlexAttention backend against the reference block-sparse executor (CPU, small sizes).

Eager flex (`compile=False`) ignores the BlockMask's block lists and evaluates `mask_mod` densely,
so two kinds of checks are needed:

* end to end through eager flex (the backend encodes the selection in `mask_mod` for that path):
  GQA, scaling, LSE base, padding masks, empty rows, ragged and chunked lengths;
* the BlockMask itself, interpreted the way the compiled kernel does (FULL blocks without
  `mask_mod`, PARTIAL blocks with it): exact FULL/PARTIAL split and the attention it implies.

The compiled CPU path (which does read the block lists) is slow to compile cold (~30-40 s on two
cores), so it only runs with ATTNPATCH_TEST_FLEX_COMPILE=1.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings

import pytest
import torch

from attnpatch.backends import flex
from attnpatch.backends.flex import flex_block_sparse_attention, padding_key_validity, selection_to_block_mask
from attnpatch.backends.reference import block_sparse_attention
from attnpatch.sparsity import BlockSelection, causal_block_limit, num_blocks

ATOL = RTOL = 1e-5

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def make_selection(b, h, lq, lk, bq, bk, seed=0, shared=False, empty=(), density=(0.1, 0.8)):
    """Random causal selection keeping block 0 and the diagonal; density differs per head."""
    g = torch.Generator().manual_seed(seed)
    r, c = num_blocks(lq, bq), num_blocks(lk, bk)
    limit = causal_block_limit(lq, lk, bq, bk)
    hh = 1 if shared else h
    p = torch.linspace(*density, hh).view(1, hh, 1, 1)
    keep = torch.rand(b, hh, r, c, generator=g) < p
    col = torch.arange(c)
    keep |= col == 0
    keep |= col == (limit - 1).view(1, 1, r, 1)
    keep &= col < limit.view(1, 1, r, 1)
    for bi, hi, ri in empty:  # query blocks that see nothing
        keep[bi, hi, ri] = False
    sel = BlockSelection.from_block_mask(keep, bq, bk, lq, lk)
    if shared:
        sel = BlockSelection(sel.indices.expand(b, h, -1, -1), sel.counts.expand(b, h, -1), bq, bk, lq, lk)
    sel.validate()
    return sel


def padding_mask(key_valid: torch.Tensor, lq: int) -> torch.Tensor:
    """transformers-style boolean mask [B, 1, Lq, Lk]: causal AND key valid."""
    lk = key_valid.shape[-1]
    causal = torch.arange(lk) <= torch.arange(lq).view(lq, 1) + (lk - lq)
    return (causal & key_valid[:, None, :]).unsqueeze(1)


def qkv(b, hq, hkv, lq, lk, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, hq, lq, d, generator=g),
        torch.randn(b, hkv, lk, d, generator=g),
        torch.randn(b, hkv, lk, d, generator=g),
    )


def dense_block_lists(counts, indices, n_kb):
    """[B, H, R, C] boolean from flex's (num_blocks, indices) lists."""
    w = indices.shape[-1]
    valid = torch.arange(w) < counts.unsqueeze(-1)
    out = torch.zeros(*counts.shape, n_kb + 1, dtype=torch.bool)
    out.scatter_(-1, torch.where(valid, indices.long(), n_kb), True)
    return out[..., :n_kb]


def emulate_kernel_mask(bm, b, hq, lq, lk):
    """Token mask [B, Hq, Lq, Lk] the compiled kernel applies: PARTIAL & mask_mod | FULL."""
    bq, bk = bm.BLOCK_SIZE
    n_kb = num_blocks(lk, bk)
    part = dense_block_lists(bm.kv_num_blocks, bm.kv_indices, n_kb)
    full = dense_block_lists(bm.full_kv_num_blocks, bm.full_kv_indices, n_kb)

    def tokens(blocks):
        t = blocks.repeat_interleave(bq, 2).repeat_interleave(bk, 3)[:, :, :lq, :lk]
        return t.expand(b, hq, lq, lk)

    mm = bm.mask_mod(
        torch.arange(b).view(b, 1, 1, 1),
        torch.arange(hq).view(1, hq, 1, 1),
        torch.arange(lq).view(1, 1, lq, 1),
        torch.arange(lk).view(1, 1, 1, lk),
    )
    return (tokens(part) & mm) | tokens(full)


def dense_attention(q, k, v, token_mask, scale=None):
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    s = s.masked_fill(~token_mask, float("-inf"))
    return (torch.softmax(s, -1).nan_to_num(0.0) @ v.double()).to(q.dtype), torch.logsumexp(s, -1).float()


# (b, hq, hkv, lq, lk, bq, bk, shared, empty query blocks)
CASES = [
    (2, 4, 2, 100, 100, 16, 16, False, ((0, 1, 2),)),  # ragged, GQA, an empty query block
    (1, 4, 2, 100, 150, 16, 32, False, ()),  # chunked prefill, block_q < block_k
    (2, 4, 4, 150, 150, 32, 16, True, ()),  # block_q > block_k, selection shared by heads
    (1, 4, 1, 64, 64, 16, 16, False, ()),  # block multiples, MQA
    (1, 4, 2, 1, 40, 16, 16, False, ()),  # one query row at the end of the keys
]
CASE_IDS = ["ragged-gqa-empty", "chunked-bq<bk", "bq>bk-shared", "multiple-mqa", "single-row"]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_eager_flex_matches_reference(case):
    b, hq, hkv, lq, lk, bq, bk, shared, empty = case
    q, k, v = qkv(b, hq, hkv, lq, lk, seed=lq + lk)
    sel = make_selection(b, hq, lq, lk, bq, bk, seed=lq, shared=shared, empty=empty)
    if not shared:
        assert len(set(sel.counts.sum((0, 2)).tolist())) > 1, "heads should keep different block counts"
    out, lse = flex_block_sparse_attention(q, k, v, sel, return_lse=True, compile=False)
    ref, ref_lse = block_sparse_attention(q, k, v, sel, return_lse=True)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(lse, ref_lse, atol=ATOL, rtol=RTOL)  # natural log, -inf where empty
    assert lse.dtype == torch.float32 and lse.shape == (b, hq, lq)
    for bi, hi, ri in empty:
        rows = slice(ri * bq, min(lq, (ri + 1) * bq))
        assert torch.all(out[bi, hi, rows] == 0) and torch.all(lse[bi, hi, rows] == float("-inf"))
    # Negative control: dropping a selected non-diagonal block changes the result.
    keep = sel.to_block_mask()
    limit = causal_block_limit(lq, lk, bq, bk)
    r = int(torch.nonzero(limit > 1)[-1])
    keep[:, :, r, : limit[r] - 1] = False
    fewer = BlockSelection.from_block_mask(keep, bq, bk, lq, lk)
    assert not torch.allclose(flex_block_sparse_attention(q, k, v, fewer, compile=False), out, atol=1e-3)


def test_scale_and_no_lse():
    q, k, v = qkv(1, 4, 2, 70, 90)
    sel = make_selection(1, 4, 70, 90, 16, 16, seed=3)
    out = flex_block_sparse_attention(q, k, v, sel, scale=0.3, compile=False)
    torch.testing.assert_close(out, block_sparse_attention(q, k, v, sel, scale=0.3), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_mask_matches_reference(side):
    b, hq, hkv, lq, lk, bq, bk = 2, 4, 2, 100, 100, 16, 32
    q, k, v = qkv(b, hq, hkv, lq, lk, seed=7)
    sel = make_selection(b, hq, lq, lk, bq, bk, seed=7)
    key_valid = torch.ones(b, lk, dtype=torch.bool)
    if side == "left":
        key_valid[0, :37] = False  # 37 pad tokens: whole blocks and a partial one
    else:
        key_valid[1, 71:] = False
    mask = padding_mask(key_valid, lq)
    out, lse = flex_block_sparse_attention(q, k, v, sel, mask=mask, return_lse=True, compile=False)
    ref, ref_lse = block_sparse_attention(q, k, v, sel, mask=mask, return_lse=True)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(lse, ref_lse, atol=ATOL, rtol=RTOL)


def test_padding_mask_chunked_prefill_key_validity():
    lq, lk = 30, 90
    key_valid = torch.ones(2, lk, dtype=torch.bool)
    key_valid[1, :20] = False
    mask = padding_mask(key_valid, lq)
    torch.testing.assert_close(padding_key_validity(mask, lq, lk), key_valid)


def test_unsupported_masks_raise():
    lq = lk = 40
    q, k, v = qkv(1, 2, 2, lq, lk)
    sel = make_selection(1, 2, lq, lk, 16, 16)
    key_valid = torch.ones(1, lk, dtype=torch.bool)
    key_valid[0, :10] = False
    mask = padding_mask(key_valid, lq)
    unmasked = mask.clone()
    unmasked[:, :, :10] = True  # SDPA's "unmask unattended" rows: not causal AND key_valid
    holes = mask.clone()
    holes[0, 0, 30, 20] = False  # arbitrary 4D mask
    for bad in (unmasked, holes, mask.float(), mask.expand(1, 2, lq, lk), mask[..., :-1]):
        with pytest.raises(ValueError):
            flex_block_sparse_attention(q, k, v, sel, mask=bad, compile=False)
    # Values above the causal diagonal are irrelevant (the causal rule removes them anyway).
    upper = mask | torch.triu(torch.ones(lq, lk, dtype=torch.bool), 1)
    torch.testing.assert_close(padding_key_validity(upper, lq, lk), key_valid[:, :])


def test_rejects_mismatched_inputs():
    q, k, v = qkv(1, 4, 2, 32, 32)
    sel = make_selection(1, 4, 32, 48, 16, 16)
    with pytest.raises(ValueError):
        flex_block_sparse_attention(q, k, v, sel, compile=False)
    sel = make_selection(1, 2, 32, 32, 16, 16)
    with pytest.raises(ValueError):
        flex_block_sparse_attention(q, k, v, sel, compile=False)
    if "skip" in {f.name for f in dataclasses.fields(BlockSelection)}:  # BLASST tiles cannot be skipped
        from attnpatch.sparsity import SkipRule

        sel = dataclasses.replace(make_selection(1, 4, 32, 32, 16, 16), skip=SkipRule(-5.0))
        with pytest.raises(ValueError):
            flex_block_sparse_attention(q, k, v, sel, compile=False)


STRUCT_CASES = [
    (2, 4, 2, 100, 100, 16, 16, False, ((1, 3, 0),)),
    (1, 4, 2, 100, 150, 16, 32, False, ()),
    (2, 4, 4, 150, 150, 32, 16, True, ()),
    (1, 2, 2, 64, 200, 32, 16, False, ()),
    (1, 2, 1, 128, 128, 64, 64, False, ()),
]


@pytest.mark.parametrize("layout", ["exact-compact", "exact-wide", "padded"])
@pytest.mark.parametrize("padded", [False, True], ids=["nomask", "leftpad"])
@pytest.mark.parametrize("case", STRUCT_CASES)
def test_block_mask_split_and_kernel_semantics(case, padded, layout):
    """FULL = selected blocks where mask_mod holds everywhere; PARTIAL = the other selected ones;
    attending as the kernel would (mask_mod on PARTIAL only) reproduces the reference."""
    exact = layout != "padded"
    if exact and not flex._EXACT_LENGTHS:
        pytest.skip("this torch cannot build BlockMasks for exact lengths")
    b, hq, hkv, lq, lk, bq, bk, shared, empty = case
    sel = make_selection(b, hq, lq, lk, bq, bk, seed=lk, shared=shared, empty=empty)
    key_valid = None
    if padded:
        key_valid = torch.ones(b, lk, dtype=torch.bool)
        key_valid[0, : lk // 3 + 5] = False
    bm = selection_to_block_mask(sel, key_valid, exact_lengths=exact, compact_lists=layout == "exact-compact")
    r, c = num_blocks(lq, bq), num_blocks(lk, bk)
    assert (bq, bk) == tuple(bm.BLOCK_SIZE)
    assert tuple(bm.shape[-2:]) == ((lq, lk) if exact else (r * bq, c * bk))
    assert bm.kv_indices.shape[1] == (1 if shared else hq)
    k = sel.indices.shape[-1]
    assert bm.kv_indices.shape[-1] == (min(c, 1 << (k - 1).bit_length()) if layout == "exact-compact" else c)
    assert bm.kv_indices.dtype == bm.kv_num_blocks.dtype == torch.int32

    part = dense_block_lists(bm.kv_num_blocks, bm.kv_indices, c).expand(b, hq, r, c)
    full = dense_block_lists(bm.full_kv_num_blocks, bm.full_kv_indices, c).expand(b, hq, r, c)
    selected = sel.to_block_mask()
    assert not (part & full).any()
    assert torch.equal(part | full, selected)
    for counts, indices in ((bm.kv_num_blocks, bm.kv_indices), (bm.full_kv_num_blocks, bm.full_kv_indices)):
        valid = torch.arange(indices.shape[-1]) < counts.unsqueeze(-1)
        steps = indices[..., 1:] - indices[..., :-1]
        assert (steps[valid[..., 1:]] > 0).all(), "block lists must stay ascending"

    # mask_mod over every real query row and every key slot of every block (kv < C·bk).
    mm = bm.mask_mod(
        torch.arange(b).view(b, 1, 1, 1),
        torch.arange(hq).view(1, hq, 1, 1),
        torch.arange(lq).view(1, 1, lq, 1),
        torch.arange(c * bk).view(1, 1, 1, c * bk),
    ).expand(b, hq, lq, c * bk)
    mm = torch.cat([mm, mm.new_ones(b, hq, r * bq - lq, c * bk)], 2)  # rows past Lq do not exist
    all_true = mm.view(b, hq, r, bq, c, bk).all(5).all(3)
    assert torch.equal(full, selected & all_true)
    assert torch.equal(part, selected & ~all_true)

    q, k, v = qkv(b, hq, hkv, lq, lk, seed=1)
    mask = None if key_valid is None else padding_mask(key_valid, lq)
    ref, ref_lse = block_sparse_attention(q, k, v, sel, mask=mask, return_lse=True)
    out, lse = dense_attention(q, k, v, emulate_kernel_mask(bm, b, hq, lq, lk))
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(lse, ref_lse, atol=ATOL, rtol=RTOL)


def test_padded_layout_end_to_end(monkeypatch):
    """Older torch (no seq_lengths): Q/K/V padded to block multiples, output sliced back."""
    monkeypatch.setattr(flex, "_EXACT_LENGTHS", False)
    b, hq, hkv, lq, lk = 1, 4, 2, 70, 100
    q, k, v = qkv(b, hq, hkv, lq, lk, seed=5)
    sel = make_selection(b, hq, lq, lk, 16, 32, seed=5)
    key_valid = torch.ones(b, lk, dtype=torch.bool)
    key_valid[0, :21] = False
    mask = padding_mask(key_valid, lq)
    out, lse = flex_block_sparse_attention(q, k, v, sel, mask=mask, return_lse=True, compile=False)
    ref, ref_lse = block_sparse_attention(q, k, v, sel, mask=mask, return_lse=True)
    assert out.shape == ref.shape and lse.shape == ref_lse.shape
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(lse, ref_lse, atol=ATOL, rtol=RTOL)


@pytest.mark.skipif(not flex._EXACT_LENGTHS, reason="needs seq_lengths/compute_q_blocks")
def test_q_side_metadata_for_backward():
    sel = make_selection(1, 2, 100, 100, 16, 16, seed=2)
    bm = selection_to_block_mask(sel, with_q_blocks=True)
    c = num_blocks(100, 16)
    assert bm.kv_indices.shape[-1] == c and bm.q_indices is not None
    kv_side = dense_block_lists(bm.kv_num_blocks, bm.kv_indices, c)
    q_side = dense_block_lists(bm.q_num_blocks, bm.q_indices, kv_side.shape[2])
    assert torch.equal(q_side.transpose(-1, -2), kv_side)
    assert selection_to_block_mask(sel).q_indices is None


@pytest.mark.parametrize("compact", [True, False], ids=["compact-lists", "cpu-default-lists"])
def test_block_mask_memory_is_block_sized(compact):
    """At Lq = Lk = 8192 with 128-blocks the BlockMask holds O(R·K) ints (O(R·C) with C-wide lists,
    still blocks, not tokens) and nothing Lq×Lk is allocated while building it."""
    if compact and not flex._EXACT_LENGTHS:
        pytest.skip("compact lists need exact lengths")
    b, h, length, blk = 1, 4, 8192, 128
    sel = make_selection(b, h, length, length, blk, blk, seed=11, density=(0.02, 0.1))
    r, k = sel.indices.shape[2:]
    c = num_blocks(length, blk)
    key_valid = torch.ones(b, length, dtype=torch.bool)
    key_valid[0, :300] = False
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        bm = selection_to_block_mask(sel, key_valid, compact_lists=compact or None)
    width = bm.kv_indices.shape[-1]
    assert width == (1 << (k - 1).bit_length() if compact else c)
    assert width < c or not compact
    names = (
        "kv_num_blocks",
        "kv_indices",
        "full_kv_num_blocks",
        "full_kv_indices",
        "q_num_blocks",
        "q_indices",
    )
    for name in names:
        t = getattr(bm, name)
        if t is not None:
            assert t.numel() <= b * h * r * width, name
    biggest = max(max(e.cpu_memory_usage, 0) for e in prof.events())
    assert biggest < length * length // 64, f"an allocation of {biggest} bytes while building the BlockMask"


@pytest.mark.skipif(
    os.environ.get("ATTNPATCH_TEST_FLEX_COMPILE") != "1", reason="set ATTNPATCH_TEST_FLEX_COMPILE=1"
)
def test_compiled_cpu_flex_matches_reference():
    """The compiled kernel reads the block lists (no selection table in mask_mod): the real split."""
    b, hq, hkv, lq, lk, bq, bk = 2, 4, 2, 100, 300, 16, 32
    q, k, v = qkv(b, hq, hkv, lq, lk, seed=9)
    sel = make_selection(b, hq, lq, lk, bq, bk, seed=9, empty=((1, 2, 3),), density=(0.0, 0.3))
    key_valid = torch.ones(b, lk, dtype=torch.bool)
    key_valid[0, :37] = False
    mask = padding_mask(key_valid, lq)
    bm = selection_to_block_mask(sel, padding_key_validity(mask, lq, lk))
    assert bm.kv_indices.shape[-1] == num_blocks(lk, bk)  # C++ flex needs C-wide lists
    assert sel.indices.shape[-1] < num_blocks(lk, bk)  # so they really are padded past the count
    with warnings.catch_warnings(), torch.no_grad():  # CPU compiled flex: inference only, no LSE
        warnings.simplefilter("ignore")
        out = flex_block_sparse_attention(q, k, v, sel, mask=mask, compile=True)
    torch.testing.assert_close(out, block_sparse_attention(q, k, v, sel, mask=mask), atol=ATOL, rtol=RTOL)
    assert torch.all(out[1, 2, 3 * bq : 4 * bq] == 0)
