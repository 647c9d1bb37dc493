"""flash-attn-4 backend: the selection -> fa4 block-list conversion, checked on CPU through a pure-torch
interpreter of fa4's block-sparse forward, plus GPU checks of `flash_prefill` itself.

The interpreter follows what fa4 4.0.0b36 does (block_sparse_utils.py `consume_block_sparse_loads`,
mask.py `apply_mask`): per query block it visits the mask list and then the full list, each from its
last entry down; mask blocks get the masking predicate, full blocks none (the strict contract; on
SM90 fa4 also applies its causal/local mask to full blocks, a no-op for true full blocks); only the
first block visited in each list gets the `seqlen_k` bound, and keys past `Lk` read as zeros (TMA
fill), so a ragged block in the wrong place would add spurious zero scores and the test would see it.
"""

from __future__ import annotations

import math

import pytest
import torch

from attnpatch.backends.flash import (
    FlashBlockSparse,
    flash_prefill,
    flash_unavailable_reason,
    input_reason,
    selection_to_block_sparse,
    unsupported_reason,
)
from attnpatch.backends.reference import block_sparse_attention
from attnpatch.bench.selections import random_block_selection
from attnpatch.sparsity import BlockSelection, SkipRule, TokenSelection, causal_block_limit, num_blocks

# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def make_selection(b, h, lq, lk, bq, bk, seed=0, shared=False, shared_batch=False, empty=(), density=0.5):
    """Random causal block selection; `empty` lists (b, h, r) query blocks that keep nothing."""
    g = torch.Generator().manual_seed(seed)
    r, c = num_blocks(lq, bq), num_blocks(lk, bk)
    limit = causal_block_limit(lq, lk, bq, bk).view(1, 1, r, 1)
    bb, hh = (1 if shared_batch else b), (1 if shared else h)
    col = torch.arange(c)
    keep = (torch.rand(bb, hh, r, c, generator=g) < density) | (col == 0) | (col == limit - 1)
    keep &= col < limit
    for bi, hi, ri in empty:
        keep[bi, hi, ri] = False
    sel = BlockSelection.from_block_mask(keep, bq, bk, lq, lk)
    if shared or shared_batch:
        sel = BlockSelection(sel.indices.expand(b, h, -1, -1), sel.counts.expand(b, h, -1), bq, bk, lq, lk)
    sel.validate()
    return sel


def visibility(lq, lk, key_start=None, window=None, batch=1):
    """Boolean [B, 1, Lq, Lk]: key j visible from query i (position Lk - Lq + i)."""
    p = (torch.arange(lq) + lk - lq).view(lq, 1)
    j = torch.arange(lk).view(1, lk)
    ok = (j <= p).expand(batch, 1, lq, lk).clone()
    if key_start is not None:
        ok &= j.view(1, 1, 1, lk) >= key_start.cpu().view(-1, 1, 1, 1)
    if window is not None:
        ok &= (p - j) < window
    return ok


def qkv(b, hq, hkv, lq, lk, d, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=g)
    k = torch.randn(b, hkv, lk, d, generator=g)
    v = torch.randn(b, hkv, lk, d, generator=g)
    return (t.to(device=device, dtype=dtype) for t in (q, k, v))


def interpret_fa4(query, key, value, bs: FlashBlockSparse, scale, lq_offset_mode="mask_mod", key_start=None,
                  window=None):
    """Pure-torch model of fa4's block-sparse forward. Returns (out, lse) in float32.

    `lq_offset_mode`: "mask_mod" (mask blocks: causal AND window AND padding, our mask_mod) or
    "causal" (mask blocks: fa4's causal / local mask, no padding).
    """
    b, hq, lq, d = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    group = hq // hkv
    bq, bk = bs.block_size
    n_qb, n_kb = num_blocks(lq, bq), num_blocks(lk, bk)
    for t in bs[:4]:
        assert t.dtype == torch.int32
        assert t.shape[0] in (1, b) and t.shape[1] in (1, hq) and t.shape[2] == n_qb
    for t in (bs.mask_block_idx, bs.full_block_idx):
        assert 1 <= t.shape[-1] <= n_kb and t.stride(-1) == 1
    kpad = torch.zeros(b, hkv, n_kb * bk, d, dtype=torch.float32)
    vpad = torch.zeros(b, hkv, n_kb * bk, d, dtype=torch.float32)
    kpad[:, :, :lk] = key.float()
    vpad[:, :, :lk] = value.float()
    out = torch.zeros(b, hq, lq, d)
    lse = torch.full((b, hq, lq), float("-inf"))
    off = lk - lq
    for bi in range(b):
        for h in range(hq):
            for m in range(n_qb):
                rows = torch.arange(m * bq, min((m + 1) * bq, lq))
                p = (rows + off).view(-1, 1)
                scores, values = [], []
                for cnt_t, idx_t, masked in ((bs.mask_block_cnt, bs.mask_block_idx, True),
                                             (bs.full_block_cnt, bs.full_block_idx, False)):
                    cnt = int(cnt_t[min(bi, cnt_t.shape[0] - 1), min(h, cnt_t.shape[1] - 1), m])
                    lst = idx_t[min(bi, idx_t.shape[0] - 1), min(h, idx_t.shape[1] - 1), m, :cnt].tolist()
                    assert lst == sorted(set(lst)), "lists must be strictly ascending"
                    for order, n in enumerate(reversed(lst)):
                        assert 0 <= n < n_kb
                        j = torch.arange(n * bk, (n + 1) * bk).view(1, -1)
                        s = query[bi, h, rows].float() @ kpad[bi, h // group, n * bk:(n + 1) * bk].T * scale
                        allowed = torch.ones_like(s, dtype=torch.bool)
                        if order == 0:
                            allowed &= j < lk  # seqlen bound: first block visited in each list only
                        if masked:
                            allowed &= j <= p
                            if window is not None:
                                allowed &= (p - j) < window
                            if lq_offset_mode == "mask_mod" and key_start is not None:
                                allowed &= j >= int(key_start[bi])
                        scores.append(s.masked_fill(~allowed, float("-inf")))
                        values.append(vpad[bi, h // group, n * bk:(n + 1) * bk])
                if not scores:
                    continue
                s = torch.cat(scores, dim=1)
                row_lse = torch.logsumexp(s, dim=1)
                probs = torch.softmax(s, dim=1).nan_to_num(0.0)
                out[bi, h, rows] = probs @ torch.cat(values, dim=0)
                lse[bi, h, rows] = row_lse
    return out, lse


def reference(query, key, value, selection, scale, key_start=None, window=None):
    b, _, lq, _ = query.shape
    lk = key.shape[2]
    mask = None
    if key_start is not None or window is not None:
        mask = visibility(lq, lk, key_start, window, batch=b).to(query.device)
    return block_sparse_attention(query, key, value, selection, scale=scale, mask=mask, return_lse=True)


def assert_close_lse(lse, ref_lse, atol=1e-4):
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    fin = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[fin], ref_lse[fin], atol=atol, rtol=atol)


# (name, b, hq, hkv, lq, lk, bq, bk, window, key_start, selection options)
CASES = [
    ("gqa", 2, 4, 2, 300, 300, 64, 64, None, None, {}),
    ("chunked", 1, 4, 1, 100, 333, 32, 32, None, None, {}),
    ("ragged_bq_ne_bk", 2, 2, 2, 257, 257, 64, 32, None, None, {}),
    ("padding", 3, 2, 1, 200, 200, 32, 32, None, [0, 45, 64], {}),
    ("padding_chunked", 2, 2, 2, 70, 250, 32, 32, None, [17, 220], {}),
    ("window_small", 2, 2, 1, 260, 260, 32, 32, 20, None, {}),
    ("window_blocks", 1, 4, 2, 300, 300, 64, 64, 128, None, {}),
    ("window_pad_chunked", 2, 2, 1, 90, 290, 32, 32, 77, [5, 200], {}),
    ("shared_heads", 2, 6, 2, 200, 200, 32, 32, None, None, {"shared": True}),
    ("shared_batch", 2, 4, 4, 160, 200, 32, 32, 50, None, {"shared": True, "shared_batch": True}),
    ("shared_padded", 2, 4, 2, 160, 160, 32, 32, 40, [30, 0], {"shared": True, "shared_batch": True}),
    ("padding_whole_row", 2, 2, 1, 150, 200, 32, 32, 70, [200, 199], {}),
    ("empty_rows", 2, 2, 2, 200, 200, 32, 32, None, [0, 40], {"empty": [(0, 1, 2), (1, 0, 0), (1, 1, 6)]}),
    ("dense_sel", 1, 2, 1, 131, 131, 32, 32, None, None, {"density": 1.0}),
]
# windows around block multiples (rounding edges of the threshold arithmetic), aligned and chunked
CASES += [(f"window_edge_w{w}_off{lk - lq}", 1, 2, 1, lq, lk, 32, 32, w, ks, {"density": 1.0})
          for w in (1, 2, 31, 32, 33, 34, 63, 64, 65) for lq, lk, ks in ((128, 128, None), (97, 160, [33]))]


def _case(case):
    name, b, hq, hkv, lq, lk, bq, bk, window, ks, opts = case
    sel = make_selection(b, hq, lq, lk, bq, bk, seed=len(name), **opts)
    key_start = torch.tensor(ks) if ks is not None else None
    return sel, key_start, window


# ---------------------------------------------------------------------------------------------
# conversion (CPU)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("mode", ["mask_mod", "causal"])
def test_conversion_interpreted_matches_reference(case, mode):
    name, b, hq, hkv, lq, lk, bq, bk, window, ks, opts = case
    sel, key_start, window = _case(case)
    if mode == "causal" and key_start is not None:
        pytest.skip("padding always runs through the mask_mod mode")
    q, k, v = qkv(b, hq, hkv, lq, lk, 16, seed=1)
    scale = 0.3
    bs = selection_to_block_sparse(sel, key_start, window)
    out, lse = interpret_fa4(q, k, v, bs, scale, mode, key_start, window)
    ref_out, ref_lse = reference(q, k, v, sel, scale, key_start, window)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    assert_close_lse(lse, ref_lse)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_conversion_is_minimal_and_exact(case):
    """FULL blocks have every (row, key) pair visible, PARTIAL ones some but not all, and a selected
    block with no visible pair is dropped; together they are exactly the selected visible blocks."""
    name, b, hq, hkv, lq, lk, bq, bk, window, ks, opts = case
    sel, key_start, window = _case(case)
    bs = selection_to_block_sparse(sel, key_start, window)
    vis = visibility(lq, lk, key_start, window, batch=b)[:, 0]
    n_qb, n_kb = num_blocks(lq, bq), num_blocks(lk, bk)
    pad = torch.zeros(b, n_qb * bq, n_kb * bk, dtype=torch.bool)
    pad[:, :lq, :lk] = vis
    blocks_vis = pad.view(b, n_qb, bq, n_kb, bk)
    any_vis = blocks_vis.any(-1).any(-2)  # [B, R, C]
    # full: every pair (real row, key) visible, and no key of the block lies past Lk
    pad_row = (torch.arange(n_qb * bq) >= lq).view(1, n_qb, bq, 1, 1)
    keys_real = (torch.arange(n_kb * bk) < lk).view(n_kb, bk).all(-1)
    all_vis = (blocks_vis | pad_row).all(-1).all(-2) & keys_real
    table = sel.to_block_mask()
    for bi in range(b):
        for h in range(hq):
            for m in range(n_qb):
                def lst(cnt_t, idx_t, bi=bi, h=h, m=m):
                    cnt = int(cnt_t[min(bi, cnt_t.shape[0] - 1), min(h, cnt_t.shape[1] - 1), m])
                    return set(idx_t[min(bi, idx_t.shape[0] - 1), min(h, idx_t.shape[1] - 1), m, :cnt].tolist())

                full = lst(bs.full_block_cnt, bs.full_block_idx)
                part = lst(bs.mask_block_cnt, bs.mask_block_idx)
                chosen = {c for c in range(n_kb) if table[bi, h, m, c]}
                want = {c for c in chosen if any_vis[bi, m, c]}
                assert not (full & part)
                assert full | part == want
                assert full == {c for c in want if all_vis[bi, m, c]}


def test_shared_selection_stays_broadcast():
    sel = make_selection(2, 8, 256, 256, 64, 64, shared=True)
    bs = selection_to_block_sparse(sel)
    assert bs.mask_block_cnt.shape == (2, 1, 4) and bs.full_block_idx.shape[:3] == (2, 1, 4)
    dense = BlockSelection.causal(3, 8, 256, 512, 128, 128)
    bs = selection_to_block_sparse(dense, window=100)
    assert bs.mask_block_cnt.shape == (1, 1, 2)
    bs = selection_to_block_sparse(dense, key_start=torch.tensor([0, 10, 300]))
    assert bs.mask_block_cnt.shape == (3, 1, 2)


def test_dense_selection_lists():
    """Causal selection, Lq = Lk = 4 blocks of 128: block r has r full blocks and the diagonal partial."""
    sel = BlockSelection.causal(1, 1, 512, 512, 128, 128)
    bs = selection_to_block_sparse(sel)
    assert bs.full_block_cnt.flatten().tolist() == [0, 1, 2, 3]
    assert bs.mask_block_cnt.flatten().tolist() == [1, 1, 1, 1]
    assert bs.mask_block_idx[0, 0, :, 0].tolist() == [0, 1, 2, 3]
    assert bs.full_block_idx[0, 0, 3, :3].tolist() == [0, 1, 2]
    # chunked prefill aligned to a block: every selected block of the chunk is full but the diagonal
    sel = BlockSelection.causal(1, 1, 128, 512, 128, 128)
    bs = selection_to_block_sparse(sel)
    assert bs.full_block_cnt.flatten().tolist() == [3] and bs.mask_block_cnt.flatten().tolist() == [1]
    # window of 128 keys with 128-key blocks: the diagonal and the block before are partial, rest dropped
    sel = BlockSelection.causal(1, 1, 512, 512, 128, 128)
    bs = selection_to_block_sparse(sel, window=128)
    assert bs.full_block_cnt.flatten().tolist() == [0, 0, 0, 0]
    assert bs.mask_block_cnt.flatten().tolist() == [1, 2, 2, 2]


def test_random_block_selection_roundtrip():
    sel = random_block_selection(1, 4, 1000, 128, 0.3, seed=3)
    q, k, v = qkv(1, 4, 2, 1000, 1000, 16)
    bs = selection_to_block_sparse(sel)
    out, lse = interpret_fa4(q, k, v, bs, 0.25)
    ref_out, ref_lse = reference(q, k, v, sel, 0.25)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    assert_close_lse(lse, ref_lse)


def test_empty_slot_dimension():
    sel = BlockSelection(torch.zeros(1, 1, 2, 0, dtype=torch.int32), torch.zeros(1, 1, 2, dtype=torch.int32),
                         64, 64, 128, 128)
    bs = selection_to_block_sparse(sel)
    assert bs.mask_block_idx.shape[-1] == 1 and int(bs.mask_block_cnt.sum() + bs.full_block_cnt.sum()) == 0


# ---------------------------------------------------------------------------------------------
# reasons (CPU: the arch-parametrised part of unsupported_reason)
# ---------------------------------------------------------------------------------------------


def _inputs(b=1, hq=4, hkv=2, lq=256, lk=256, d=128, dtype=torch.bfloat16):
    return tuple(qkv(b, hq, hkv, lq, lk, d, dtype=dtype))


def test_reasons_accept_supported_inputs():
    q, k, v = _inputs()
    sel = make_selection(1, 4, 256, 256, 128, 128)
    assert input_reason(q, k, v, None, arch=90) is None
    assert input_reason(q, k, v, sel, arch=90) is None
    assert input_reason(q, k, v, sel, torch.tensor([3]), 100, arch=90) is None
    q, k, v = _inputs(d=64)
    assert input_reason(q, k, v, make_selection(1, 4, 256, 256, 64, 64), arch=90) is None
    q, k, v = _inputs(d=256)
    assert input_reason(q, k, v, make_selection(1, 4, 256, 256, 128, 64), arch=90) is None
    q, k, v = _inputs(lq=512, lk=512)
    assert input_reason(q, k, v, make_selection(1, 4, 512, 512, 256, 128), arch=100) is None


@pytest.mark.parametrize(
    "what, expect",
    [
        ("fp32", "float16/bfloat16"),
        ("mixed", "dtypes differ"),
        ("heads", "multiple of key/value heads"),
        ("lq_gt_lk", "must not outnumber"),
        ("token", "block selections only"),
        ("skip", "skip-threshold"),
        ("shape", "selection built for"),
        ("bk32", "block_k in (64, 128)"),
        ("bk128_d256", "must equal it"),
        ("bq96", "multiple of its"),
        ("sm100_bq128", "multiple of 256"),
        ("sm100_d256", "head dim <= 128"),
        ("sm80", "SM90 or SM100"),
        ("grad", "backward"),
        ("window", "positive int"),
        ("key_start", "key_start must be"),
        ("d_odd", "multiple of 8"),
        ("d_big", "8..256"),
        ("masking", "unknown masking"),
    ],
)
def test_reasons_decline(what, expect):
    q, k, v = _inputs()
    sel = make_selection(1, 4, 256, 256, 128, 128)
    kw = {"arch": 90}
    args = [q, k, v, sel]
    extra = {}
    if what == "fp32":
        args[:3] = _inputs(dtype=torch.float32)
    elif what == "mixed":
        args[1] = k.half()
    elif what == "heads":
        args[:3] = _inputs(hq=3, hkv=2)
        args[3] = make_selection(1, 3, 256, 256, 128, 128)
    elif what == "lq_gt_lk":
        args[:3] = _inputs(lq=300, lk=256)
        args[3] = None
    elif what == "token":
        args[3] = TokenSelection(sel.indices, sel.counts, 128, 256, 256)
    elif what == "skip":
        args[3] = BlockSelection(sel.indices, sel.counts, 128, 128, 256, 256, SkipRule(-5.0))
    elif what == "shape":
        args[3] = make_selection(1, 4, 200, 256, 128, 128)
    elif what == "bk32":
        args[3] = make_selection(1, 4, 256, 256, 128, 32)
    elif what == "bk128_d256":
        args[:3] = _inputs(d=256)
    elif what == "bq96":
        args[3] = make_selection(1, 4, 256, 256, 96, 128)
    elif what == "sm100_bq128":
        kw["arch"] = 100
    elif what == "sm100_d256":
        args[:3] = _inputs(d=256)
        args[3] = make_selection(1, 4, 256, 256, 256, 128)
        kw["arch"] = 100
    elif what == "sm80":
        kw["arch"] = 80
    elif what == "grad":
        args[0] = q.clone().requires_grad_(True)
    elif what == "window":
        extra["window"] = 0
    elif what == "key_start":
        extra["key_start"] = torch.tensor([1.0])
    elif what == "d_odd":
        args[:3] = _inputs(d=36)
        args[3] = None
    elif what == "d_big":
        args[:3] = _inputs(d=320)
        args[3] = None
    elif what == "masking":
        extra["masking"] = "nope"
    reason = input_reason(*args, **extra, **kw)
    assert reason is not None and expect in reason, reason


def test_padding_dense_checks_native_blocks():
    q, k, v = _inputs(d=256)
    assert input_reason(q, k, v, None, torch.tensor([4]), arch=90) is None
    assert "head dim <= 128" in input_reason(q, k, v, None, torch.tensor([4]), arch=100)


def test_unavailable_on_cpu():
    q, k, v = _inputs()
    assert "CUDA" in flash_unavailable_reason("cpu")
    assert "CUDA" in unsupported_reason(q, k, v, None)
    with pytest.raises(ValueError, match="CUDA"):
        flash_prefill(q, k, v, scale=0.1)


# ---------------------------------------------------------------------------------------------
# GPU: flash_prefill against the reference (bf16)
# ---------------------------------------------------------------------------------------------

_GPU_SKIP = flash_unavailable_reason("cuda") if torch.cuda.is_available() else "no CUDA device"

GPU_CASES = [
    # name, b, hq, hkv, lq, lk, d, block (None: dense), window, key_start, shared
    ("dense", 1, 8, 2, 1000, 1000, 128, None, None, None, False),
    ("dense_chunked", 2, 4, 4, 300, 1100, 64, None, None, None, False),
    ("dense_window", 1, 4, 1, 900, 900, 128, None, 200, None, False),
    ("dense_padding", 2, 8, 2, 700, 700, 128, None, None, [0, 130], False),
    ("sparse_gqa", 2, 8, 2, 1000, 1000, 128, 128, None, None, False),
    ("sparse_shared", 1, 9, 3, 1100, 1100, 64, 128, None, None, True),
    ("sparse_chunked", 1, 8, 2, 333, 1500, 128, 128, None, None, False),
    ("sparse_padding", 2, 8, 2, 900, 900, 128, 128, None, [77, 256], False),
    ("sparse_window", 1, 8, 2, 1200, 1200, 128, 128, 300, None, False),
    ("sparse_window_pad", 2, 4, 2, 600, 1000, 128, 128, 333, [10, 500], True),
    ("sparse_block64", 1, 4, 2, 700, 700, 128, 64, None, None, False),
]


@pytest.mark.skipif(_GPU_SKIP is not None, reason=str(_GPU_SKIP))
@pytest.mark.parametrize("case", GPU_CASES, ids=[c[0] for c in GPU_CASES])
@pytest.mark.parametrize("masking", ["mask_mod", "causal"])
def test_flash_prefill_matches_reference(case, masking):
    name, b, hq, hkv, lq, lk, d, block, window, ks, shared = case
    if masking == "causal" and (block is None or ks is not None):
        pytest.skip("dense calls and padded calls do not depend on the masking mode")
    q, k, v = qkv(b, hq, hkv, lq, lk, d, seed=2, dtype=torch.bfloat16, device="cuda")
    key_start = torch.tensor(ks, device="cuda") if ks is not None else None
    scale = 1.0 / math.sqrt(d)
    if block is None:
        sel = BlockSelection.causal(b, hq, lq, lk, 64, 64, device="cuda")
        run_sel = None
    else:
        sel = make_selection(b, hq, lq, lk, block, block, seed=5, shared=shared, empty=[(0, 0, 1)])
        sel = BlockSelection(sel.indices.cuda(), sel.counts.cuda(), block, block, lq, lk)
        run_sel = sel
    assert unsupported_reason(q, k, v, run_sel, key_start, window, masking) is None
    out, lse = flash_prefill(q, k, v, run_sel, scale=scale, key_start=key_start, window=window,
                             return_lse=True, masking=masking)
    ref_out, ref_lse = reference(q.float(), k.float(), v.float(), sel, scale, key_start, window)
    err = (out.float() - ref_out).norm() / ref_out.norm()
    assert err < 2e-2, float(err)
    assert_close_lse(lse, ref_lse, atol=2e-2)


@pytest.mark.skipif(_GPU_SKIP is not None, reason=str(_GPU_SKIP))
def test_conversion_has_no_host_sync():
    sel = random_block_selection(1, 32, 8192, 128, 0.1, device="cuda")
    ks = torch.tensor([100], device="cuda")
    selection_to_block_sparse(sel, ks, 1000)  # warm the row-bound cache
    torch.cuda.set_sync_debug_mode("error")
    try:
        selection_to_block_sparse(sel, ks, 1000)
        selection_to_block_sparse(sel)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ---------------------------------------------------------------------------------------------
# the one-launch Triton list builder (CPU interpreter) gives the PyTorch path's tensors exactly
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def interpreted_lists():
    from triton_interpreted import load_interpreted

    module, why = load_interpreted("flash_lists.py")
    if module is None:
        pytest.skip(why)
    return module


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_triton_lists_equal_torch_lists(case, interpreted_lists, monkeypatch):
    import sys

    from triton_interpreted import interpret_env

    sel, key_start, window = _case(case)
    want = selection_to_block_sparse(sel, key_start, window, impl="torch")
    monkeypatch.setitem(sys.modules, "attnpatch.backends.triton.flash_lists", interpreted_lists)
    with interpret_env():
        got = selection_to_block_sparse(sel, key_start, window, impl="triton")
    for name in ("mask_block_cnt", "mask_block_idx", "full_block_cnt", "full_block_idx"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype == torch.int32 and a.shape == b.shape, name
        assert torch.equal(a, b), name


def test_triton_lists_int64_and_wide(interpreted_lists, monkeypatch):
    """int64 selection tensors, K > number of key blocks (list width capped), K padded to a power of 2."""
    import sys

    from triton_interpreted import interpret_env

    sel = make_selection(2, 3, 200, 200, 32, 32, seed=4)
    pad = torch.zeros(*sel.indices.shape[:3], 5, dtype=torch.int64)
    wide = BlockSelection(torch.cat([sel.indices.long(), pad], -1), sel.counts.long(), 32, 32, 200, 200)
    want = selection_to_block_sparse(wide, torch.tensor([3, 70]), 90, impl="torch")
    monkeypatch.setitem(sys.modules, "attnpatch.backends.triton.flash_lists", interpreted_lists)
    with interpret_env():
        got = selection_to_block_sparse(wide, torch.tensor([3, 70]), 90, impl="triton")
    assert got.mask_block_idx.shape[-1] == num_blocks(200, 32)
    for a, b in zip(got[:4], want[:4], strict=True):
        assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_triton_lists_equal_torch_lists_gpu(case):
    from attnpatch.backends.triton.flash_lists import can_run

    sel, key_start, window = _case(case)
    sel = BlockSelection(sel.indices.cuda(), sel.counts.cuda(), sel.block_q, sel.block_k, sel.q_len, sel.kv_len)
    if not can_run(sel.indices):
        pytest.skip("triton cannot run here")
    ks = key_start.cuda() if key_start is not None else None
    got = selection_to_block_sparse(sel, ks, window, impl="triton")
    want = selection_to_block_sparse(sel, ks, window, impl="torch")
    for a, b in zip(got[:4], want[:4], strict=True):
        assert torch.equal(a, b)
