"""Triton block-sparse attention kernel vs the PyTorch references, under the Triton CPU interpreter.

The kernel module is loaded as a private copy decorated under the interpreter, so the result does
not depend on whether other tests imported `attnpatch.backends.triton.block_sparse` (compiled for
the GPU) first, and those tests never get interpreted kernels from this module. TRITON_INTERPRET
is restored after import and set again only while these tests run.
"""

import math

import pytest
import torch
from triton_interpreted import interpret_env, load_interpreted

from attnpatch.backends.reference import (
    block_sparse_attention,
    block_sparse_attention_tiled_reference,
    merge_partials,
)
from attnpatch.methods.prefill.blasst import lambda_bound
from attnpatch.sparsity import BlockSelection, causal_block_limit, num_blocks

_kernels, _why = load_interpreted("block_sparse.py")
if _kernels is None:
    pytest.skip(_why, allow_module_level=True)
block_sparse_attention_triton = _kernels.block_sparse_attention_triton
unsupported_reason = _kernels.unsupported_reason


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


def _qkv(b, hq, hkv, lq, lk, d, dtype, seed=0, layout="bhld"):
    g = torch.Generator().manual_seed(seed)
    if layout == "blhd":  # [B, L, H, D] storage viewed as [B, H, L, D]: non-contiguous B/H/L strides
        q = torch.randn(b, lq, hq, d, generator=g).to(dtype).transpose(1, 2)
        k = torch.randn(b, lk, hkv, d, generator=g).to(dtype).transpose(1, 2)
        v = torch.randn(b, lk, hkv, d, generator=g).to(dtype).transpose(1, 2)
    else:
        q = torch.randn(b, hq, lq, d, generator=g).to(dtype)
        k = torch.randn(b, hkv, lk, d, generator=g).to(dtype)
        v = torch.randn(b, hkv, lk, d, generator=g).to(dtype)
    return q, k, v


def _selection(b, hq, lq, lk, bq, bk, density, seed=0, keep_first=True, keep_diag=True):
    """Random causal selection; `density` is a float or one value per head."""
    g = torch.Generator().manual_seed(seed)
    r, c = num_blocks(lq, bq), num_blocks(lk, bk)
    limit = causal_block_limit(lq, lk, bq, bk).view(1, 1, r, 1)
    dens = torch.as_tensor(density, dtype=torch.float32).reshape(1, -1, 1, 1).expand(1, hq, 1, 1)
    cols = torch.arange(c)
    mask = (torch.rand(b, hq, r, c, generator=g) < dens) & (cols < limit)
    if keep_first:
        mask[..., 0] = True
    if keep_diag:
        mask |= cols == limit - 1
    sel = BlockSelection.from_block_mask(mask, bq, bk, lq, lk)
    sel.validate()
    return sel


def _sel_from_mask(mask, like):
    sel = BlockSelection.from_block_mask(mask, like.block_q, like.block_k, like.q_len, like.kv_len)
    sel.validate()
    return sel


def _close(a, b, atol, rtol=0.0):
    assert a.shape == b.shape
    torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol)


def _close_lse(a, b):
    assert torch.equal(torch.isinf(a), torch.isinf(b))
    fin = torch.isfinite(b)
    _close(a[fin], b[fin], LSE_ATOL, 1e-5)


CASES = [
    # b, hq, hkv, lq, lk, d, bq, bk
    pytest.param(1, 4, 2, 150, 150, 64, 64, 64, id="gqa-self-150"),
    pytest.param(2, 4, 2, 100, 230, 64, 64, 64, id="gqa-chunked-b2"),
    pytest.param(1, 4, 2, 200, 200, 64, 128, 64, id="bq128-bk64"),
    pytest.param(1, 4, 2, 90, 250, 64, 64, 128, id="bq64-bk128-chunked"),
    pytest.param(1, 4, 1, 77, 77, 32, 32, 16, id="small-blocks-mqa"),
    pytest.param(1, 2, 1, 200, 300, 128, 128, 128, id="d128-b128-chunked"),
    pytest.param(1, 4, 1, 150, 200, 256, 128, 128, id="d256-b128-subtiles-chunked"),
    pytest.param(1, 2, 1, 130, 130, 256, 64, 64, id="d256-b64"),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize(("b", "hq", "hkv", "lq", "lk", "d", "bq", "bk"), CASES)
def test_matches_reference(b, hq, hkv, lq, lk, d, bq, bk, dtype):
    q, k, v = _qkv(b, hq, hkv, lq, lk, d, dtype, seed=lq + lk)
    sel = _selection(b, hq, lq, lk, bq, bk, density=[0.9, 0.5, 0.25, 0.0][:hq], seed=bq * bk)
    out, lse = block_sparse_attention_triton(q, k, v, sel, return_lse=True)
    ref_out, ref_lse = block_sparse_attention(q, k, v, sel, return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    _close(out, ref_out, ATOL[dtype])
    _close_lse(lse, ref_lse)


@pytest.mark.parametrize(("sub_m", "sub_n"), [(64, 64), (64, 128), (128, 64), (32, 32)])
def test_sub_tiles_match_reference(sub_m, sub_n):
    """A 128×128 selection block run as smaller kernel tiles computes the same attention."""
    q, k, v = _qkv(1, 4, 2, 200, 300, 64, torch.float16, seed=11)
    sel = _selection(1, 4, 200, 300, 128, 128, density=[0.9, 0.5, 0.25, 0.0], seed=5)
    out, lse = block_sparse_attention_triton(q, k, v, sel, return_lse=True, sub_m=sub_m, sub_n=sub_n)
    ref_out, ref_lse = block_sparse_attention(q, k, v, sel, return_lse=True)
    _close(out, ref_out, ATOL[torch.float16])
    _close_lse(lse, ref_lse)


def test_strided_inputs_and_custom_scale():
    q, k, v = _qkv(1, 4, 2, 130, 190, 64, torch.float16, seed=3, layout="blhd")
    assert not q.is_contiguous() and not k.is_contiguous()
    sel = _selection(1, 4, 130, 190, 64, 64, density=0.6, seed=4)
    out = block_sparse_attention_triton(q, k, v, sel, scale=0.3)
    _close(out, block_sparse_attention(q, k, v, sel, scale=0.3), ATOL[torch.float16])


@pytest.mark.parametrize(("bq", "bk"), [(64, 64), (128, 64)])
def test_diagonal_only_and_empty_rows(bq, bk):
    """Rows that see only their diagonal block; with bq > bk and only the last diagonal block
    kept, the early rows of a query block see no key at all (zero output, lse = -inf); a query
    block with an empty list likewise."""
    b, hq, hkv, lq, lk, d = 1, 4, 2, 190, 190, 64
    q, k, v = _qkv(b, hq, hkv, lq, lk, d, torch.float32, seed=5)
    sel = _selection(b, hq, lq, lk, bq, bk, density=0.0, seed=0, keep_first=False)
    mask = sel.to_block_mask()
    mask[:, 1, 0] = False  # head 1, query block 0: nothing selected
    sel = _sel_from_mask(mask, sel)
    assert int(sel.counts.max()) == 1
    out, lse = block_sparse_attention_triton(q, k, v, sel, return_lse=True)
    ref_out, ref_lse = block_sparse_attention(q, k, v, sel, return_lse=True)
    _close(out, ref_out, ATOL[torch.float32])
    _close_lse(lse, ref_lse)
    assert torch.isinf(lse[:, 1, :bq]).all() and (out[:, 1, :bq] == 0).all()
    if bq > bk:  # query block 0 keeps only key block 1: its first bk rows precede every kept key
        assert torch.isinf(lse[:, 0, :bk]).all() and (out[:, 0, :bk] == 0).all()
        assert torch.isfinite(lse[:, 0, bk:]).all()


def test_tiled_reference_without_skip_is_the_reference():
    q, k, v = _qkv(1, 4, 2, 120, 200, 64, torch.float32, seed=6)
    sel = _selection(1, 4, 120, 200, 64, 64, density=0.5, seed=7)
    out, lse = block_sparse_attention_tiled_reference(q, k, v, sel, return_lse=True)
    ref_out, ref_lse = block_sparse_attention(q, k, v, sel, return_lse=True)
    _close(out, ref_out, 1e-5)
    _close_lse(lse, ref_lse)


def _split(sel, seed):
    """Two disjoint selections whose union is `sel`."""
    g = torch.Generator().manual_seed(seed)
    mask = sel.to_block_mask()
    coin = torch.rand(mask.shape, generator=g) < 0.5
    return _sel_from_mask(mask & coin, sel), _sel_from_mask(mask & ~coin, sel)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_lse_merge_and_resume_equal_union(dtype):
    b, hq, hkv, lq, lk, d = 1, 4, 2, 140, 200, 64
    q, k, v = _qkv(b, hq, hkv, lq, lk, d, dtype, seed=8)
    union = _selection(b, hq, lq, lk, 64, 64, density=0.7, seed=9)
    part_a, part_b = _split(union, seed=10)
    ref_out, ref_lse = block_sparse_attention(q, k, v, union, return_lse=True)

    out_a, lse_a = block_sparse_attention_triton(q, k, v, part_a, return_lse=True)
    out_b, lse_b = block_sparse_attention_triton(q, k, v, part_b, return_lse=True)
    merged, merged_lse = merge_partials(out_a, lse_a, out_b, lse_b)
    _close(merged, ref_out, ATOL[dtype])
    _close_lse(merged_lse, ref_lse)

    # Resume: pass A leaves an un-normalised state, pass B continues from it.
    state, lse_state = block_sparse_attention_triton(q, k, v, part_a, return_state=True, return_lse=True)
    _close_lse(lse_state, lse_a)
    m, denom, acc = state
    assert m.dtype == denom.dtype == acc.dtype == torch.float32 and acc.shape == (b, hq, lq, d)
    seen = denom > 0
    _close_lse(torch.where(seen, m + torch.log(denom), torch.full_like(m, -math.inf)), lse_a)
    out, lse = block_sparse_attention_triton(q, k, v, part_b, init_state=state, return_lse=True)
    _close(out, ref_out, ATOL[dtype])
    _close_lse(lse, ref_lse)

    # Chaining states (A → state → B → state) and the state of the tiled reference agree too.
    state_ab = block_sparse_attention_triton(q, k, v, part_b, init_state=state, return_state=True)
    ref_state = block_sparse_attention_tiled_reference(q, k, v, union, return_state=True)
    lse_ab = state_ab[0] + torch.log(state_ab[1])
    _close_lse(lse_ab, ref_lse)
    _close(state_ab[2] / state_ab[1].unsqueeze(-1), ref_state[2] / ref_state[1].unsqueeze(-1), ATOL[dtype])


def _first_block_only(sel):
    mask = torch.zeros_like(sel.to_block_mask())
    first = sel.indices[..., :1].long()
    mask.scatter_(-1, first, (sel.counts > 0).unsqueeze(-1))
    return _sel_from_mask(mask, sel)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_skip_extremes(dtype):
    b, hq, hkv, lq, lk, d = 1, 4, 2, 170, 240, 64
    q, k, v = _qkv(b, hq, hkv, lq, lk, d, dtype, seed=11)
    sel = _selection(b, hq, lq, lk, 64, 64, density=0.8, seed=12)
    visited = int(sel.counts.sum())
    ref_out, ref_lse = block_sparse_attention(q, k, v, sel, return_lse=True)

    # λ = 0: ln λ = -inf, nothing is skipped.
    out, lse, (vis, skipped) = block_sparse_attention_triton(
        q, k, v, sel, return_lse=True, skip_bound=float("-inf"), count_tiles=True
    )
    assert (int(vis), int(skipped)) == (visited, 0)
    assert vis.dtype == skipped.dtype == torch.int64
    _close(out, ref_out, ATOL[dtype])
    _close_lse(lse, ref_lse)

    # Huge λ: every tile after the first of each row block is skipped (block 0 is always kept and
    # with bq = bk it gives every row a running max).
    out, lse, (vis, skipped) = block_sparse_attention_triton(
        q, k, v, sel, return_lse=True, skip_bound=_bound(1e30, d), count_tiles=True
    )
    nonempty = int((sel.counts > 0).sum())
    assert (int(vis), int(skipped)) == (visited, visited - nonempty)
    first_out, first_lse = block_sparse_attention(q, k, v, _first_block_only(sel), return_lse=True)
    _close(out, first_out, ATOL[dtype])
    _close_lse(lse, first_lse)


@pytest.mark.parametrize(
    ("convention", "lam", "bq", "bk"),
    [
        ("raw", 0.05, 64, 64),
        ("raw", 1.0, 128, 64),
        ("scaled", 0.3, 64, 64),
        ("scaled", "per-head", 64, 128),
        ("raw", "per-head", 32, 16),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_skip_matches_tiled_reference(convention, lam, bq, bk, dtype):
    b, hq, hkv, lq, lk = 1, 4, 2, 150, 260
    d = 32 if bk < 64 else 64
    q, k, v = _qkv(b, hq, hkv, lq, lk, d, dtype, seed=13)
    # A few "sink" keys with large logits make later tiles skippable under moderate λ.
    k[:, :, :4] *= 4
    if lam == "per-head":
        lam = torch.tensor([0.0, 0.01, 0.3, 10.0]) if convention == "scaled" else torch.tensor([0.0, 0.1, 1.0, 100.0])
    sel = _selection(b, hq, lq, lk, bq, bk, density=[1.0, 0.7, 0.5, 0.3], seed=14)
    kw = dict(return_lse=True, skip_bound=_bound(lam, d, convention), count_tiles=True)
    out, lse, (vis, skipped) = block_sparse_attention_triton(q, k, v, sel, **kw)
    ref_out, ref_lse, (ref_vis, ref_skipped) = block_sparse_attention_tiled_reference(q, k, v, sel, **kw)
    assert int(vis) == int(ref_vis) == int(sel.counts.sum())
    assert int(skipped) == int(ref_skipped)
    assert 0 < int(skipped) < int(vis)  # a meaningful mix of skipped and computed tiles
    _close(out, ref_out, ATOL[dtype])
    _close_lse(lse, ref_lse)


def test_skip_with_resumed_state():
    """Skip decisions continue from a resumed running max (the first tile of pass B can be skipped)."""
    b, hq, hkv, lq, lk, d = 1, 4, 2, 128, 256, 64
    q, k, v = _qkv(b, hq, hkv, lq, lk, d, torch.float32, seed=15)
    # Keys 0..7 act as an attention sink: every query shares a component along `u` with them.
    u = torch.randn(d, generator=torch.Generator().manual_seed(0))
    q += u
    k[:, :, :8] = 2 * u + 0.1 * k[:, :, :8]
    union = _selection(b, hq, lq, lk, 64, 64, density=0.8, seed=16)
    mask = union.to_block_mask()
    cols = torch.arange(mask.shape[-1])
    part_a, part_b = _sel_from_mask(mask & (cols == 0), union), _sel_from_mask(mask & (cols > 0), union)
    kw = dict(skip_bound=_bound(0.2, d), count_tiles=True)
    state, (_, skipped_a) = block_sparse_attention_triton(q, k, v, part_a, return_state=True, **kw)
    assert int(skipped_a) == 0
    ref_state, _ = block_sparse_attention_tiled_reference(q, k, v, part_a, return_state=True, **kw)
    for got, want in zip(state, ref_state, strict=True):
        _close(got, want, 1e-4)
    out, (vis_b, skipped_b) = block_sparse_attention_triton(q, k, v, part_b, init_state=state, **kw)
    ref_out, (_, ref_skipped_b) = block_sparse_attention_tiled_reference(q, k, v, part_b, init_state=ref_state, **kw)
    assert int(vis_b) >= int(skipped_b) == int(ref_skipped_b) > 0
    _close(out, ref_out, 1e-4)
    # resuming in two passes = one pass over the union with the same rule
    whole, (_, skipped_all) = block_sparse_attention_triton(q, k, v, union, **kw)
    assert int(skipped_all) == int(skipped_b)
    _close(out, whole, 1e-4)


def test_counters_without_skip():
    q, k, v = _qkv(1, 4, 2, 100, 100, 64, torch.float16, seed=17)
    sel = _selection(1, 4, 100, 100, 64, 64, density=0.5, seed=18)
    out, (vis, skipped) = block_sparse_attention_triton(q, k, v, sel, count_tiles=True)
    assert (int(vis), int(skipped)) == (int(sel.counts.sum()), 0)
    _close(out, block_sparse_attention(q, k, v, sel), ATOL[torch.float16])


def test_unsupported_inputs_raise():
    q, k, v = _qkv(1, 2, 1, 64, 64, 96, torch.float16)
    sel = _selection(1, 2, 64, 64, 64, 64, density=1.0)
    assert "head dim" in unsupported_reason(q, k, v, sel)
    with pytest.raises(ValueError, match=r"allowed: \(16, 32, 64, 128, 256\)"):
        block_sparse_attention_triton(q, k, v, sel)
    q, k, v = _qkv(1, 2, 1, 64, 64, 64, torch.float16)
    with pytest.raises(ValueError, match="NaN"):
        block_sparse_attention_triton(q, k, v, sel, skip_bound=float("nan"))
    odd = BlockSelection(sel.indices, sel.counts, 48, 64, 64, 64)
    with pytest.raises(ValueError, match="blocks"):
        block_sparse_attention_triton(q, k, v, odd)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_left_padding_key_start(dtype):
    """Left padding as a per-row first key: equals the reference with transformers' 4D mask."""
    b, lq, lk = 3, 150, 150
    q, k, v = _qkv(b, 4, 2, lq, lk, 64, dtype, seed=21)
    sel = _selection(b, 4, lq, lk, 64, 64, density=[0.9, 0.5, 0.25, 0.6], seed=3)
    key_start = torch.tensor([0, 37, 130])
    valid = torch.arange(lk)[None, :] >= key_start[:, None]
    mask = (torch.ones(lq, lk, dtype=torch.bool).tril()[None] & valid[:, None, :])[:, None]
    out = block_sparse_attention_triton(q, k, v, sel, key_start=key_start)
    ref = block_sparse_attention(q, k, v, sel, mask=mask)
    _close(out, ref, ATOL[dtype])
    assert torch.all(out[2, :, :130] == 0)  # padded query rows see no key


TMA_CASES = [
    pytest.param(1, 4, 2, 150, 150, 64, 64, 64, "bhld", id="gqa-64"),
    pytest.param(2, 4, 2, 100, 230, 64, 64, 64, "blhd", id="chunked-strided"),
    pytest.param(1, 2, 1, 200, 300, 128, 128, 128, "bhld", id="d128-b128"),
]


@pytest.mark.parametrize(("b", "hq", "hkv", "lq", "lk", "d", "bq", "bk", "layout"), TMA_CASES)
def test_tma_variant_matches_reference(b, hq, hkv, lq, lk, d, bq, bk, layout):
    """Variant 2 (K/V through TMA descriptors; rows past Lk come back zero-filled) computes the same
    attention as the reference, also with left padding and in skip mode (same skip decisions as the
    pointer-load variant)."""
    q, k, v = _qkv(b, hq, hkv, lq, lk, d, torch.float16, seed=lq, layout=layout)
    sel = _selection(b, hq, lq, lk, bq, bk, density=[0.9, 0.5, 0.25, 0.0][:hq], seed=bk)
    out, lse = block_sparse_attention_triton(q, k, v, sel, return_lse=True, variant=2)
    ref_out, ref_lse = block_sparse_attention(q, k, v, sel, return_lse=True)
    _close(out, ref_out, ATOL[torch.float16])
    _close_lse(lse, ref_lse)
    key_start = torch.tensor([min(lk - 1, 37)] * b)
    _close(block_sparse_attention_triton(q, k, v, sel, key_start=key_start, variant=2),
           block_sparse_attention_triton(q, k, v, sel, key_start=key_start, variant=1), 0.0)
    tma = block_sparse_attention_triton(q, k, v, sel, skip_bound=_bound(0.05, d), count_tiles=True, variant=2)
    plain = block_sparse_attention_triton(q, k, v, sel, skip_bound=_bound(0.05, d), count_tiles=True, variant=1)
    _close(tma[0], plain[0], 0.0)
    assert [int(x) for x in tma[1]] == [int(x) for x in plain[1]]


def test_stride0_causal_selection_is_not_materialised():
    """`BlockSelection.causal` (stride-0 index list) runs as is and equals its contiguous copy."""
    q, k, v = _qkv(1, 4, 2, 150, 230, 64, torch.float16, seed=8)
    sel = BlockSelection.causal(1, 4, 150, 230, 64, 64)
    assert sel.indices.stride(1) == 0 and sel.indices.stride(2) == 0
    dense_copy = BlockSelection(sel.indices.contiguous(), sel.counts.contiguous(), 64, 64, 150, 230)
    _close(block_sparse_attention_triton(q, k, v, sel), block_sparse_attention_triton(q, k, v, dense_copy), 0.0)
    _close(block_sparse_attention_triton(q, k, v, sel), block_sparse_attention(q, k, v, sel), ATOL[torch.float16])


@pytest.mark.parametrize(("b", "hq", "hkv", "lq", "lk", "d", "bq", "bk"), CASES)
def test_mask_free_prefix_in_kernel(b, hq, hkv, lq, lk, d, bq, bk):
    """The kernel's own walk back over the masked list tail gives the same attention as the
    host-computed prefix, for chunked prefill, ragged lengths and bq != bk; also on `causal()`."""
    q, k, v = _qkv(b, hq, hkv, lq, lk, d, torch.float16, seed=lq + lk)
    for sel in (_selection(b, hq, lq, lk, bq, bk, density=[0.9, 0.5, 0.25, 0.0][:hq], seed=bq * bk),
                BlockSelection.causal(b, hq, lq, lk, bq, bk)):
        host = block_sparse_attention_triton(q, k, v, sel, full_in_kernel=False)
        _close(block_sparse_attention_triton(q, k, v, sel, full_in_kernel=True), host, 0.0)


def test_tma_falls_back_to_pointer_loads_when_unaligned():
    """A K/V view whose base or strides are not 16-byte aligned cannot be a TMA descriptor: the
    wrapper then runs variant 1, with the same result."""
    q, k, v = _qkv(1, 4, 2, 100, 100, 64, torch.float16, seed=5)
    buf_k = torch.randn(1, 2, 100 * 64 + 1).to(torch.float16)
    k_odd = buf_k[..., 1:].view(1, 2, 100, 64)  # base 2 bytes past an aligned address
    k_odd.copy_(k)
    assert _kernels._tensor_descriptor(k_odd, 64) is None and _kernels._tensor_descriptor(k, 64) is not None
    sel = _selection(1, 4, 100, 100, 32, 32, density=0.6, seed=1)
    _close(block_sparse_attention_triton(q, k_odd, v, sel, variant=2), block_sparse_attention_triton(q, k, v, sel),
           0.0)


def test_unknown_variant_is_refused():
    q, k, v = _qkv(1, 2, 1, 64, 64, 32, torch.float16)
    sel = _selection(1, 2, 64, 64, 32, 32, density=1.0)
    with pytest.raises(ValueError, match=r"variant must be one of \(0, 1, 2\)"):
        block_sparse_attention_triton(q, k, v, sel, variant=3)
