"""Split-KV sparse decode kernel vs the PyTorch references, under the Triton CPU interpreter.

Like tests/test_kernels_triton.py, the kernel module is loaded as a private copy decorated under
the interpreter (independent of whether another test imported the GPU-compiled module first), and
TRITON_INTERPRET is restored after import and set again only while these tests run.
"""

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from triton_interpreted import interpret_env, load_interpreted

from attnpatch.backends import decode_plan
from attnpatch.backends.reference import paged_decode_attention, sparse_decode_attention_reference
from attnpatch.methods.prefill.blasst import lambda_bound
from attnpatch.sparsity import PageSelection, num_blocks

_mod, _why = load_interpreted("decode.py")
if _mod is None:
    pytest.skip(_why, allow_module_level=True)
sparse_decode_attention = _mod.sparse_decode_attention
decode_reference = sparse_decode_attention_reference


@pytest.fixture(autouse=True, scope="module")
def _interpret_while_testing():
    with interpret_env():
        yield


ATOL = {torch.float16: 2e-3, torch.float32: 1e-4}


def _bound(lam, d, convention="raw"):
    """λ as the kernels' skip bound (one value, or a tensor of per-head values)."""
    scale = 1.0 / math.sqrt(d)
    if isinstance(lam, torch.Tensor):
        return torch.tensor([lambda_bound(float(x), scale, convention) for x in lam])
    return lambda_bound(lam, scale, convention)
LSE_ATOL = 1e-4


def _qkv(b, hq, hkv, lk, d, dtype, seed=0, layout="bhld"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, 1, d, generator=g).to(dtype)
    if layout == "blhd":  # [B, L, H, D] storage viewed as [B, H, L, D]
        k = torch.randn(b, lk, hkv, d, generator=g).to(dtype).transpose(1, 2)
        v = torch.randn(b, lk, hkv, d, generator=g).to(dtype).transpose(1, 2)
    elif layout == "slice":  # the first lk rows of a longer cache buffer
        k = torch.randn(b, hkv, lk + 37, d, generator=g).to(dtype)[:, :, :lk]
        v = torch.randn(b, hkv, lk + 37, d, generator=g).to(dtype)[:, :, :lk]
    else:
        k = torch.randn(b, hkv, lk, d, generator=g).to(dtype)
        v = torch.randn(b, hkv, lk, d, generator=g).to(dtype)
    return q, k, v


def _selection(b, hkv, lk, page, counts, seed=0, keep_first=True):
    """Random ascending page lists; `counts` per (b, hkv) in row-major order (clamped to the pages)."""
    g = torch.Generator().manual_seed(seed)
    n = num_blocks(lk, page)
    idx = torch.zeros(b, hkv, n, dtype=torch.int32)
    cnt = torch.zeros(b, hkv, dtype=torch.int32)
    for i in range(b * hkv):
        c = min(int(counts[i % len(counts)]), n)
        if keep_first and c > 0:
            pages = torch.cat(
                [torch.zeros(1, dtype=torch.long), 1 + torch.randperm(n - 1, generator=g)[: c - 1]]
            )
        else:
            pages = torch.randperm(n, generator=g)[:c]
        pages = pages.sort().values
        idx[i // hkv, i % hkv, :c] = pages.to(torch.int32)
        cnt[i // hkv, i % hkv] = c
    return PageSelection(idx, cnt, page, lk)


def _check(out, ref, dtype, lse=None, ref_lse=None):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out.float(), ref.float(), atol=ATOL[dtype], rtol=0)
    if lse is not None:
        assert lse.shape == ref_lse.shape and lse.dtype == torch.float32
        finite = torch.isfinite(ref_lse)
        assert torch.equal(finite, torch.isfinite(lse))
        torch.testing.assert_close(lse[finite], ref_lse[finite], atol=LSE_ATOL, rtol=0)


# ----------------------------------------------------------------------------------------------
# exact mode (no skipping) == reference.paged_decode_attention
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("heads", [(4, 2), (8, 1)], ids=["gqa4-2", "gqa8-1"])
@pytest.mark.parametrize("page", [16, 64])
def test_matches_paged_reference(dtype, heads, page):
    hq, hkv = heads
    lk = 1000  # not a multiple of any page size
    q, k, v = _qkv(2, hq, hkv, lk, 64, dtype, seed=page + hq)
    sel = _selection(2, hkv, lk, page, counts=[5, 11, 16, 3], seed=hq)  # per-head page counts differ
    ref, ref_lse = paged_decode_attention(q, k, v, sel, return_lse=True)
    out, lse = sparse_decode_attention(q, k, v, sel, return_lse=True, num_splits=3)
    _check(out, ref, dtype, lse, ref_lse)


@pytest.mark.parametrize("num_splits", [1, 2, 5, 40, None])
def test_split_counts_agree(num_splits):
    lk = 700
    q, k, v = _qkv(1, 4, 2, lk, 64, torch.float32, seed=3)
    sel = _selection(1, 2, lk, 16, counts=[29, 44], seed=1)  # 8 and 11 tiles of 64 tokens
    ref, ref_lse = paged_decode_attention(q, k, v, sel, return_lse=True)
    out, lse = sparse_decode_attention(q, k, v, sel, return_lse=True, num_splits=num_splits)
    _check(out, ref, torch.float32, lse, ref_lse)
    # the PyTorch twin with the same splits is exact too
    out_r, lse_r = decode_reference(q, k, v, sel, return_lse=True, num_splits=num_splits)
    _check(out_r, ref, torch.float32, lse_r, ref_lse)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_all_pages_equals_dense_sdpa(dtype):
    b, hq, hkv, lk, d = 1, 8, 2, 333, 64
    q, k, v = _qkv(b, hq, hkv, lk, d, dtype, seed=7)
    sel = PageSelection.all_pages(b, hkv, lk, 32)  # expanded (stride-0) index tensor
    out, lse = sparse_decode_attention(q, k, v, sel, return_lse=True, num_splits=2)
    kr = k.float().repeat_interleave(hq // hkv, 1)
    vr = v.float().repeat_interleave(hq // hkv, 1)
    dense = F.scaled_dot_product_attention(q.float(), kr, vr).to(dtype)
    dense_lse = torch.logsumexp((q.float() @ kr.transpose(-1, -2)) / math.sqrt(d), -1)
    _check(out, dense, dtype, lse, dense_lse)


@pytest.mark.parametrize("layout", ["blhd", "slice"])
def test_strided_cache_and_custom_scale(layout):
    lk = 300
    q, k, v = _qkv(2, 4, 2, lk, 32, torch.float32, seed=11, layout=layout)
    assert not k.is_contiguous()
    sel = _selection(2, 2, lk, 32, counts=[4, 9, 1, 7], seed=2)
    ref, ref_lse = paged_decode_attention(q, k, v, sel, scale=0.3, return_lse=True)
    out, lse = sparse_decode_attention(q, k, v, sel, scale=0.3, return_lse=True, num_splits=2)
    _check(out, ref, torch.float32, lse, ref_lse)


@pytest.mark.parametrize("heads", [(6, 2), (32, 1)], ids=["group3", "group32"])
def test_odd_and_large_groups(heads):
    hq, hkv = heads  # G = 3 (padded to 16 rows) and G = 32 (32 rows)
    lk = 260
    q, k, v = _qkv(1, hq, hkv, lk, 32, torch.float32, seed=hq)
    sel = _selection(1, hkv, lk, 16, counts=[9, 13], seed=4)
    ref, ref_lse = paged_decode_attention(q, k, v, sel, return_lse=True)
    out, lse = sparse_decode_attention(q, k, v, sel, return_lse=True, num_splits=2)
    _check(out, ref, torch.float32, lse, ref_lse)
    kw = dict(return_lse=True, num_splits=2, count_tiles=True, skip_bound=_bound(0.1, 32, "scaled"))
    out, lse, tiles = sparse_decode_attention(q, k, v, sel, **kw)
    out_r, lse_r, tiles_r = decode_reference(q, k, v, sel, **kw)
    _check(out, out_r, torch.float32, lse, lse_r)
    assert [int(t) for t in tiles] == [int(t) for t in tiles_r]


def test_tile_equal_to_page_and_large_pages():
    lk = 600
    q, k, v = _qkv(1, 4, 2, lk, 64, torch.float16, seed=5)
    for page, tile in [(16, 16), (32, 32), (128, None)]:
        sel = _selection(1, 2, lk, page, counts=[3, 5], seed=page)
        ref = paged_decode_attention(q, k, v, sel)
        out = sparse_decode_attention(q, k, v, sel, num_splits=2, tile_size=tile)
        _check(out, ref, torch.float16)


def test_out_of_range_pages_and_counts_are_masked():
    lk = 200  # 13 pages of 16
    q, k, v = _qkv(1, 4, 2, lk, 32, torch.float32, seed=21)
    idx = torch.tensor([[[0, 3, 12, 40], [2, 5, 7, 9]]], dtype=torch.int32)  # page 40 lies past the cache
    sel = PageSelection(idx, torch.tensor([[4, 9]], dtype=torch.int32), 16, lk)  # 9 > P = 4: clamped
    ref, ref_lse = paged_decode_attention(q, k, v, sel, return_lse=True)
    for tile in (16, 64):
        out, lse = sparse_decode_attention(q, k, v, sel, return_lse=True, num_splits=2, tile_size=tile)
        _check(out, ref, torch.float32, lse, ref_lse)
        out_r, lse_r = decode_reference(q, k, v, sel, return_lse=True, num_splits=2, tile_size=tile)
        _check(out_r, ref, torch.float32, lse_r, ref_lse)


@pytest.mark.parametrize("page", [16, 128])
def test_head_dim_256_gemma_group(page):
    """Gemma-3's shape: head dim 256, one KV head shared by four query heads, tiles of one or more pages."""
    lk = 520
    q, k, v = _qkv(2, 4, 1, lk, 256, torch.float16, seed=page)
    sel = _selection(2, 1, lk, page, counts=[3, 2] if page == 128 else [17, 9], seed=4)
    ref, ref_lse = paged_decode_attention(q, k, v, sel, return_lse=True)
    out, lse = sparse_decode_attention(q, k, v, sel, return_lse=True, num_splits=2)
    _check(out, ref, torch.float16, lse, ref_lse)


def test_head_dim_128_and_empty_head():
    lk = 200
    q, k, v = _qkv(1, 2, 2, lk, 128, torch.float16, seed=9)
    sel = _selection(1, 2, lk, 64, counts=[0, 3], seed=0)  # head 0 selects nothing
    ref, ref_lse = paged_decode_attention(q, k, v, sel, return_lse=True)
    out, lse = sparse_decode_attention(q, k, v, sel, return_lse=True, num_splits=2)
    _check(out, ref, torch.float16, lse, ref_lse)
    assert torch.all(out[:, 0] == 0) and torch.all(lse[:, 0] == float("-inf"))
    kw = dict(return_lse=True, num_splits=2, count_tiles=True, skip_bound=_bound(1e-3, 128))
    out, lse, (visited, skipped) = sparse_decode_attention(q, k, v, sel, **kw)
    out_r, lse_r, (visited_r, skipped_r) = decode_reference(q, k, v, sel, **kw)
    _check(out, out_r, torch.float16, lse, lse_r)
    assert visited.dtype == skipped.dtype == torch.int64
    assert (int(visited), int(skipped)) == (int(visited_r), int(skipped_r)) and int(visited) == 3


# ----------------------------------------------------------------------------------------------
# skip-threshold mode vs the PyTorch twin (same tiles, splits, seeding), counters included
# ----------------------------------------------------------------------------------------------


def _skewed_qkv(b, hq, hkv, lk, d, dtype, seed=0):
    """Scores with a strong sink (first 8 keys) and pages of very different magnitude."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, 1, d, generator=g)
    k = torch.randn(b, hkv, lk, d, generator=g)
    gain = torch.rand(b, hkv, num_blocks(lk, 64), 1, generator=g) ** 2 * 1.2 + 0.05
    k = k * gain.repeat_interleave(64, 2)[:, :, :lk]
    qdir = q.view(b, hkv, hq // hkv, d).mean(2)
    k[:, :, :8] += 8.0 * qdir[:, :, None] / qdir.norm(dim=-1, keepdim=True)[..., None]
    v = torch.randn(b, hkv, lk, d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize(
    "dtype,convention,lam,seed_max",
    [
        (torch.float32, "raw", 1e-3, True),
        (torch.float32, "raw", 0.05, False),
        (torch.float16, "scaled", 0.02, True),
        (torch.float16, "scaled", 0.02, False),
        (torch.float32, "scaled", "per_head", True),
    ],
)
def test_skip_matches_reference(dtype, convention, lam, seed_max):
    b, hq, hkv, lk = 2, 4, 2, 1500
    q, k, v = _skewed_qkv(b, hq, hkv, lk, 64, dtype, seed=4)
    sel = _selection(b, hkv, lk, 16, counts=[40, 61, 24, 50], seed=3)
    if lam == "per_head":
        lam = torch.tensor([0.3, 0.01, 0.1, 1e-6])
    kw = dict(return_lse=True, skip_bound=_bound(lam, 64, convention), num_splits=3, count_tiles=True)
    out, lse, (vis, skp) = sparse_decode_attention(q, k, v, sel, seed_max=seed_max, **kw)
    out_r, lse_r, (vis_r, skp_r) = decode_reference(q, k, v, sel, seed_max=seed_max, **kw)
    assert (int(vis), int(skp)) == (int(vis_r), int(skp_r))
    assert int(vis) == sum(num_blocks(c, 4) for c in sel.counts.flatten().tolist())
    assert 0 < int(skp) < int(vis)  # the data exercise both branches
    _check(out, out_r, dtype, lse, lse_r)


def test_seeding_skips_more_and_first_split_tiles_unseeded():
    b, hq, hkv, lk = 1, 8, 1, 2000
    q, k, v = _skewed_qkv(b, hq, hkv, lk, 64, torch.float32, seed=8)
    sel = _selection(b, hkv, lk, 16, counts=[120], seed=5)  # 30 tiles
    kw = dict(skip_bound=_bound(0.05, 64), num_splits=6, count_tiles=True)
    out_s, (vis_s, skp_s) = sparse_decode_attention(q, k, v, sel, seed_max=True, **kw)
    out_u, (vis_u, skp_u) = sparse_decode_attention(q, k, v, sel, seed_max=False, **kw)
    _, (_, skp_seq) = decode_reference(q, k, v, sel, skip_bound=_bound(0.05, 64), num_splits=1, count_tiles=True)
    assert int(vis_s) == int(vis_u) == 30
    assert int(skp_u) <= 30 - 6  # unseeded: the first tile of each of the 6 splits is always computed
    assert int(skp_s) > int(skp_u)  # seeding recovers skips lost to splitting ...
    assert int(skp_s) <= int(skp_seq)  # ... but not beyond what one sequential pass skips
    _check(out_s, decode_reference(q, k, v, sel, seed_max=True, **kw)[0], torch.float32)
    _check(out_u, decode_reference(q, k, v, sel, seed_max=False, **kw)[0], torch.float32)


@pytest.mark.parametrize("lam,seed_max", [(1e-30, False), (0.0, False), (1e-30, True)])
def test_tiny_threshold_equals_no_skip(lam, seed_max):
    lk = 900
    q, k, v = _qkv(2, 4, 2, lk, 64, torch.float16, seed=12)
    sel = _selection(2, 2, lk, 16, counts=[30, 12, 7, 21], seed=6)
    out0, lse0 = sparse_decode_attention(q, k, v, sel, return_lse=True, num_splits=3)
    out, lse, (vis, skp) = sparse_decode_attention(
        q, k, v, sel, return_lse=True, num_splits=3, skip_bound=_bound(lam, 64), count_tiles=True, seed_max=seed_max
    )
    assert int(skp) == 0 and int(vis) == sum(num_blocks(c, 4) for c in (30, 12, 7, 21))
    if seed_max:  # same tiles, only another exponent reference: equal up to rounding
        _check(out, out0, torch.float16, lse, lse0)
    else:  # bit for bit the no-skip computation
        assert torch.equal(out, out0) and torch.equal(lse, lse0)


def test_reference_without_skip_is_exact():
    lk = 520
    q, k, v = _qkv(2, 8, 1, lk, 16, torch.float32, seed=13)
    sel = _selection(2, 1, lk, 32, counts=[7, 17], seed=7)
    ref, ref_lse = paged_decode_attention(q, k, v, sel, return_lse=True)
    out, lse, (vis, skp) = decode_reference(q, k, v, sel, return_lse=True, num_splits=4, count_tiles=True)
    _check(out, ref, torch.float32, lse, ref_lse)
    assert int(skp) == 0 and int(vis) == num_blocks(7, 2) + num_blocks(17, 2)


# ----------------------------------------------------------------------------------------------
# configuration, validation, import guard
# ----------------------------------------------------------------------------------------------


def test_choose_num_splits():
    # H200: 132 SMs. 128K keys, 1/16 of the pages in tiles of 64 tokens -> 128 tiles per head.
    assert decode_plan.choose_num_splits(8, 128, 132) == 33
    assert decode_plan.choose_num_splits(8 * 64, 128, 132) == 1  # big batch: no split, no merge
    assert decode_plan.choose_num_splits(1, 1000, 132) == decode_plan.MAX_SPLITS
    assert decode_plan.choose_num_splits(8, 3, 132) == 1  # at least MIN_TILES_PER_SPLIT tiles per split
    assert decode_plan.choose_num_splits(8, 1, 132) == 1
    sel = _selection(1, 2, 640, 16, counts=[40, 40])
    assert decode_plan.resolve_num_splits(sel, "cpu") == decode_plan.choose_num_splits(
        2, 10, decode_plan.CPU_NOMINAL_SMS)
    assert decode_plan.resolve_num_splits(sel, "cpu", num_splits=7) == 7


def test_launch_override_sets_splits_tile_and_launch(monkeypatch):
    sel = _selection(1, 2, 640, 16, counts=[40, 40])
    monkeypatch.setenv("ATTNPATCH_DECODE_CONFIG", "8,2,5,32")
    assert decode_plan.launch_override() == (8, 2, 5, 32)
    assert decode_plan.resolve_num_splits(sel, "cpu") == 5
    assert decode_plan.resolve_num_splits(sel, "cpu", num_splits=7) == 7  # an explicit argument wins
    assert decode_plan.default_tile_size(16) == 32
    assert decode_plan.default_tile_size(64) == 64  # a tile that does not hold whole pages is not taken
    monkeypatch.setenv("ATTNPATCH_DECODE_CONFIG", "4,3,0,0")  # 0: the default rule
    assert decode_plan.launch_override() == (4, 3, None, None)
    assert decode_plan.resolve_num_splits(sel, "cpu") == decode_plan.choose_num_splits(
        2, 10, decode_plan.CPU_NOMINAL_SMS)
    for bad in ("4", "4,3,2", "a,b"):
        monkeypatch.setenv("ATTNPATCH_DECODE_CONFIG", bad)
        with pytest.raises(ValueError, match="ATTNPATCH_DECODE_CONFIG must read"):
            decode_plan.launch_override()


@pytest.mark.parametrize("config", ["2,2,3,64", "8,3,1,128"])
def test_launch_override_keeps_results(config, monkeypatch):
    lk = 700
    q, k, v = _qkv(1, 4, 2, lk, 64, torch.float32, seed=5)
    sel = _selection(1, 2, lk, 16, counts=[29, 44], seed=2)
    ref, ref_lse = paged_decode_attention(q, k, v, sel, return_lse=True)
    monkeypatch.setenv("ATTNPATCH_DECODE_CONFIG", config)
    out, lse = sparse_decode_attention(q, k, v, sel, return_lse=True)
    _check(out, ref, torch.float32, lse, ref_lse)


def test_rejects_unsupported_inputs():
    q, k, v = _qkv(1, 4, 2, 128, 48, torch.float32)
    sel = PageSelection.all_pages(1, 2, 128, 16)
    with pytest.raises(ValueError, match=r"allowed head dims: \(16, 32, 64, 128, 256\)"):
        sparse_decode_attention(q, k, v, sel)
    q, k, v = _qkv(1, 4, 2, 128, 64, torch.float32)
    with pytest.raises(ValueError, match="allowed page sizes"):
        sparse_decode_attention(q, k, v, PageSelection.all_pages(1, 2, 128, 8))
    with pytest.raises(ValueError, match="one query token"):
        sparse_decode_attention(q.expand(1, 4, 2, 64), k, v, sel)
    with pytest.raises(ValueError, match="kv_len"):
        sparse_decode_attention(q, k, v, PageSelection.all_pages(1, 2, 100, 16))
    with pytest.raises(ValueError, match="NaN"):
        sparse_decode_attention(q, k, v, sel, skip_bound=float("nan"))
    with pytest.raises(ValueError, match="tile size"):
        sparse_decode_attention(q, k, v, PageSelection.all_pages(1, 2, 128, 64), tile_size=32)


def test_import_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
        "import torch\n"
        "from attnpatch.backends.triton import decode as m\n"
        "from attnpatch.sparsity import PageSelection\n"
        "assert not m._KERNEL_INTERPRETED\n"
        "q = torch.randn(1, 2, 1, 16); k = torch.randn(1, 1, 40, 16)\n"
        "sel = PageSelection.all_pages(1, 1, 40, 16)\n"
        "try:\n"
        "    m.sparse_decode_attention(q, k, k, sel)\n"
        "except ValueError as e:\n"
        "    assert 'triton is not installed' in str(e)\n"
        "else:\n"
        "    raise AssertionError('expected ValueError')\n"
        "from attnpatch.backends.reference import sparse_decode_attention_reference\n"
        "sparse_decode_attention_reference(q, k, k, sel, skip_bound=-2.0)\n"
    )
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("num_splits", [1, 3])
def test_left_padding_key_start(num_splits):
    """Left-padded rows: cache positions before the row's first real token are masked."""
    lk = 300
    q, k, v = _qkv(3, 4, 2, lk, 64, torch.float16, seed=9)
    sel = _selection(3, 2, lk, 16, [19, 7, 12], seed=4)
    key_start = torch.tensor([0, 45, 290])
    valid = torch.arange(lk)[None, :] >= key_start[:, None]
    out, lse = sparse_decode_attention(q, k, v, sel, key_start=key_start, num_splits=num_splits, return_lse=True)
    ref, ref_lse = paged_decode_attention(q, k, v, sel, key_mask=valid, return_lse=True)
    _check(out, ref, torch.float16, lse, ref_lse)


@pytest.mark.parametrize("num_splits,skip", [(1, False), (3, False), (2, True)])
def test_key_valid_masks_any_keys(num_splits, skip):
    """Per-key validity (padding on both sides, the empty tail of a static cache): invalid keys are
    masked, also in the seed pass and under skipping; a row whose selection only holds invalid keys
    gives 0 and lse = -inf."""
    lk = 300
    q, k, v = _qkv(3, 4, 2, lk, 64, torch.float16, seed=11)
    sel = PageSelection.all_pages(3, 2, lk, 16)
    pos = torch.arange(lk)[None, :]
    valid = torch.stack([pos[0] < 130, (pos[0] >= 40) & (pos[0] < 201), pos[0] % 7 != 3])
    valid[2, :32] = False  # tile 0 of row 2 half invalid
    bound = _bound(1e-30, 64) if skip else None  # seeded skip mode that skips nothing: still exact
    out, lse = sparse_decode_attention(q, k, v, sel, key_valid=valid, num_splits=num_splits, return_lse=True,
                                       skip_bound=bound)
    ref, ref_lse = paged_decode_attention(q, k, v, sel, key_mask=valid, return_lse=True)
    _check(out, ref, torch.float16, lse, ref_lse)
    empty = torch.zeros(3, lk, dtype=torch.bool)
    out0, lse0 = sparse_decode_attention(q, k, v, sel, key_valid=empty, num_splits=num_splits, return_lse=True)
    assert torch.equal(out0.float(), torch.zeros_like(out0.float())) and bool(torch.isinf(lse0).all())


@pytest.mark.parametrize("num_splits", [1, 3])
def test_key_valid_ignores_what_invalid_slots_hold(num_splits):
    """Keys are read under the position mask and scores masked by validity afterwards: invalid slots
    holding NaN / inf (never-written memory) change nothing, in K or in V."""
    lk = 300
    q, k, v = _qkv(2, 4, 2, lk, 64, torch.float16, seed=5)
    sel = PageSelection.all_pages(2, 2, lk, 16)
    pos = torch.arange(lk)
    valid = torch.stack([pos < 150, (pos >= 20) & (pos % 5 != 0)])
    dirty_k, dirty_v = k.clone(), v.clone()
    for row in range(2):
        dirty_k[row, :, ~valid[row]] = float("nan")
        dirty_v[row, :, ~valid[row]] = float("inf")
    out, lse = sparse_decode_attention(q, dirty_k, dirty_v, sel, key_valid=valid, num_splits=num_splits,
                                       return_lse=True)
    ref, ref_lse = paged_decode_attention(q, k, v, sel, key_mask=valid, return_lse=True)
    assert bool(torch.isfinite(out).all())
    _check(out, ref, torch.float16, lse, ref_lse)


def test_key_valid_rejects_wrong_shape():
    q, k, v = _qkv(2, 4, 2, 64, 16, torch.float32)
    sel = PageSelection.all_pages(2, 2, 64, 16)
    with pytest.raises(ValueError, match="key_valid must be bool"):
        sparse_decode_attention(q, k, v, sel, key_valid=torch.ones(2, 63, dtype=torch.bool))


# ----------------------------------------------------------------------------------------------
# per-page log-sum-exp written in the same pass (a Recycled refresh's ranking)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("page,tile,splits", [(16, 64, 3), (64, 64, 1), (128, 128, 2), (32, 64, 4)])
@pytest.mark.parametrize("masking", ["none", "key_start", "key_valid"])
def test_page_lse_of_the_listed_pages(page, tile, splits, masking):
    """`page_lse=` holds each listed page's log-sum-exp of its visible keys (the reference's), -inf for a
    page with none, and leaves the pages not listed as they were; the output is the plain decode's."""
    from attnpatch.backends.reference.page_lse import listed_page_lse

    lk = 700
    q, k, v = _qkv(2, 4, 2, lk, 64, torch.float32, seed=page)
    sel = _selection(2, 2, lk, page, counts=[3, 6, 2, 5], seed=page)
    n = num_blocks(lk, page)
    bounds = {}
    visible = None
    if masking == "key_start":
        bounds["key_start"] = torch.tensor([0, 150])
        visible = torch.arange(lk)[None, :] >= bounds["key_start"][:, None]
    elif masking == "key_valid":
        visible = torch.ones(2, lk, dtype=torch.bool)
        visible[0, 3:40] = False
        visible[1, 600:] = False
        bounds["key_valid"] = visible
    buf = torch.full((2, 4, n), 7.0)  # unlisted pages keep what was there
    out = sparse_decode_attention(q, k, v, sel, num_splits=splits, tile_size=tile, page_lse=buf, **bounds)
    torch.testing.assert_close(out, sparse_decode_attention(q, k, v, sel, num_splits=splits, tile_size=tile, **bounds))
    want = listed_page_lse(q, k, sel, 64 ** -0.5, visible)
    listed = torch.zeros(2, 2, n, dtype=torch.bool)
    for b in range(2):
        for h in range(2):
            listed[b, h, sel.indices[b, h, :int(sel.counts[b, h])].long()] = True
    listed = listed.repeat_interleave(2, dim=1)  # the KV head's query heads
    assert torch.equal(buf[~listed], torch.full_like(buf[~listed], 7.0))
    got, ref = buf[listed], want[listed]
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    torch.testing.assert_close(got[torch.isfinite(ref)], ref[torch.isfinite(ref)], atol=LSE_ATOL, rtol=0)


def test_page_lse_is_refused_in_skip_mode_and_with_a_wrong_buffer():
    q, k, v = _qkv(1, 2, 1, 100, 64, torch.float32)
    sel = PageSelection.all_pages(1, 1, 100, 16)
    with pytest.raises(ValueError, match="skip mode"):
        sparse_decode_attention(q, k, v, sel, skip_bound=-3.0, page_lse=torch.zeros(1, 2, 7))
    with pytest.raises(ValueError, match=r"page_lse must be a contiguous float32 \[B=1, Hq=2, pages=7\]"):
        sparse_decode_attention(q, k, v, sel, page_lse=torch.zeros(1, 2, 6))
