"""Triton token-gather attention kernel vs `reference.token_gather_attention`, under the Triton CPU
interpreter.

The kernel module is loaded as a private copy decorated under the interpreter, so the result does
not depend on whether another test imported `attnpatch.backends.triton.gather` (compiled for the
GPU) first, and no other test gets interpreted kernels from it. TRITON_INTERPRET is restored after
the import and set again only while these tests run.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from triton_interpreted import interpret_env, load_interpreted

import attnpatch
from attnpatch.backends.reference import (
    block_sparse_attention,
    merge_partials,
    token_gather_attention,
)
from attnpatch.sparsity import BlockSelection, TokenSelection, num_blocks
from attnpatch.sparsity.split import mask_free_prefix

_PACKAGE_DIR = Path(attnpatch.__file__).parent


def test_module_imports_without_triton():
    """Importing must not fail when triton is missing; the entry point then raises ValueError.

    Runs in a fresh interpreter with `triton` blocked; `attnpatch/__init__` is bypassed (it pulls in
    transformers) so only the kernel module and its small dependencies are imported.
    """
    code = f"""
import sys, types
sys.modules["triton"] = None
sys.modules["triton.language"] = None
pkg = types.ModuleType("attnpatch")
pkg.__path__ = [{str(_PACKAGE_DIR)!r}]
sys.modules["attnpatch"] = pkg
import torch
from attnpatch.backends.triton import gather as tg
from attnpatch.sparsity import TokenSelection
x = torch.zeros(1, 1, 4, 64)
sel = TokenSelection(torch.zeros(1, 1, 1, 1, dtype=torch.int32), torch.ones(1, 1, 1, dtype=torch.int32), 16, 4, 4)
assert tg.unsupported_reason(x, x, x, sel) == "triton is not installed"
try:
    tg.token_gather_attention_triton(x, x, x, sel)
except ValueError as e:
    assert "triton is not installed" in str(e)
else:
    raise AssertionError("no ValueError")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


_tg, _SKIP_REASON = load_interpreted("gather.py")


# Every kernel test carries this mark; the import test above runs with or without triton.
needs_kernel = pytest.mark.skipif(_SKIP_REASON is not None, reason=_SKIP_REASON or "")


@pytest.fixture(autouse=True, scope="module")
def _interpret_while_testing():
    with interpret_env():
        yield


def _gather(*args, **kwargs):
    return _tg.token_gather_attention_triton(*args, **kwargs)


ATOL = {torch.float16: 2e-3, torch.float32: 1e-4}
LSE_ATOL = 1e-4
DTYPES = pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


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


def _last_positions(lq, lk, bq):
    """Absolute position of the last (real) query row of every query block."""
    r = num_blocks(lq, bq)
    return (torch.arange(r) * bq + bq).clamp(max=lq) - 1 + (lk - lq)


def _from_position_mask(mask, bq, lq, lk, pad=None):
    """TokenSelection from a boolean `[B, H, R, Lk]` position mask; slots past the count hold `pad`
    (default: an out-of-range position, which the kernel must never read)."""
    counts = mask.sum(-1, dtype=torch.int32)
    k = max(int(counts.max()) if counts.numel() else 0, 1)
    cols = torch.arange(lk)
    order = torch.where(mask, cols, lk + cols).sort(-1).values[..., :k]
    fill = lk + 1000 if pad is None else pad
    kept = torch.arange(k) < counts.unsqueeze(-1)
    idx = torch.where(kept, order, torch.full_like(order, fill)).to(torch.int32)
    return TokenSelection(idx, counts, bq, lq, lk)


def _random_mask(b, hq, lq, lk, bq, density, seed=0, causal=True):
    """Random `[B, Hq, R, Lk]` position mask; `density` a float or one value per head. With
    `causal`, only positions some row of the block can see (the kernel masks the rest per token)."""
    g = torch.Generator().manual_seed(seed)
    r = num_blocks(lq, bq)
    dens = torch.as_tensor(density, dtype=torch.float32).reshape(1, -1, 1, 1).expand(1, hq, 1, 1)
    mask = torch.rand(b, hq, r, lk, generator=g) < dens
    if causal:
        mask &= torch.arange(lk) <= _last_positions(lq, lk, bq).view(1, 1, r, 1)
    return mask


def _close(a, b, atol, rtol=0.0):
    assert a.shape == b.shape
    torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol)


def _close_lse(a, b):
    assert a.dtype == torch.float32
    assert torch.equal(torch.isinf(a), torch.isinf(b))
    fin = torch.isfinite(b)
    _close(a[fin], b[fin], LSE_ATOL, 1e-5)


# ----------------------------------------------------------------------------------------------
# Correctness against the reference
# ----------------------------------------------------------------------------------------------

CASES = [
    # b, hq, hkv, lq, lk, d, bq, chunk
    pytest.param(1, 4, 2, 150, 150, 64, 64, 64, id="gqa-self-bq64-c64"),
    pytest.param(2, 4, 2, 100, 230, 64, 32, 64, id="gqa-chunked-b2-bq32"),
    pytest.param(1, 4, 2, 130, 300, 128, 128, 128, id="d128-bq128-c128-chunked"),
    pytest.param(1, 4, 1, 77, 77, 32, 16, 16, id="small-mqa-d32"),
    pytest.param(1, 4, 1, 150, 200, 256, 64, 64, id="d256-mqa-bq64-c64-chunked"),
]


@needs_kernel
@DTYPES
@pytest.mark.parametrize(("b", "hq", "hkv", "lq", "lk", "d", "bq", "chunk"), CASES)
def test_matches_reference(b, hq, hkv, lq, lk, d, bq, chunk, dtype):
    """GQA, Lq not a multiple of block_q, chunked prefill, per-head densities (so per-head counts,
    mostly not multiples of the chunk, and one head with empty lists)."""
    q, k, v = _qkv(b, hq, hkv, lq, lk, d, dtype, seed=lq + lk)
    sel = _from_position_mask(
        _random_mask(b, hq, lq, lk, bq, [0.9, 0.4, 0.15, 0.0][:hq], seed=bq), bq, lq, lk
    )
    counts = sel.counts
    assert (counts % chunk != 0).any() and (counts > chunk).any()
    if hq == 4:
        assert (counts[:, 3] == 0).all() and not torch.equal(counts[:, 0], counts[:, 1])
    n_full = mask_free_prefix(sel.indices, counts, bq, 1, lq, lk)
    assert (n_full >= chunk).any() and (n_full < counts).any()  # both the unmasked and masked loops run
    out, lse = _gather(q, k, v, sel, return_lse=True, chunk=chunk)
    ref_out, ref_lse = token_gather_attention(q, k, v, sel, return_lse=True)
    assert out.dtype == dtype and out.shape == (b, hq, lq, d)
    _close(out, ref_out, ATOL[dtype])
    _close_lse(lse, ref_lse)
    assert torch.equal(_gather(q, k, v, sel, chunk=chunk), out)  # lse or not: same output


@needs_kernel
def test_strided_inputs_custom_scale_and_future_positions():
    """[B, L, H, D] storage, a custom scale, and lists that include future positions (masked per
    token by the kernel, not pre-filtered)."""
    b, hq, hkv, lq, lk, d, bq = 1, 4, 2, 90, 160, 64, 32
    q, k, v = _qkv(b, hq, hkv, lq, lk, d, torch.float16, seed=3, layout="blhd")
    assert not q.is_contiguous() and not k.is_contiguous()
    sel = _from_position_mask(_random_mask(b, hq, lq, lk, bq, 0.5, seed=4, causal=False), bq, lq, lk)
    out, lse = _gather(q, k, v, sel, scale=0.3, return_lse=True, chunk=32)
    ref_out, ref_lse = token_gather_attention(q, k, v, sel, scale=0.3, return_lse=True)
    _close(out, ref_out, ATOL[torch.float16])
    _close_lse(lse, ref_lse)


@needs_kernel
def test_shared_selection_read_in_place():
    """A selection shared by all heads (expanded with stride 0 over heads) is read in place."""
    b, hq, hkv, lq, lk, d, bq = 2, 4, 2, 70, 120, 32, 32
    q, k, v = _qkv(b, hq, hkv, lq, lk, d, torch.float32, seed=7)
    one = _from_position_mask(_random_mask(b, 1, lq, lk, bq, 0.5, seed=8), bq, lq, lk)
    r = one.counts.shape[-1]
    sel = TokenSelection(one.indices.expand(b, hq, r, -1), one.counts.expand(b, hq, r), bq, lq, lk)
    assert sel.indices.stride(1) == 0
    out = _gather(q, k, v, sel, chunk=16)
    _close(out, token_gather_attention(q, k, v, sel), ATOL[torch.float32])


@needs_kernel
@DTYPES
def test_rows_without_visible_keys_give_zero(dtype):
    """Rows whose only selected keys lie in their future, and empty lists: output 0, lse -inf."""
    b, hq, hkv, lq, lk, d, bq = 1, 4, 2, 48, 100, 64, 32  # rows at positions 52..99
    q, k, v = _qkv(b, hq, hkv, lq, lk, d, dtype, seed=9)
    mask = torch.zeros(b, hq, 2, lk, dtype=torch.bool)
    mask[:, 0, 0, [90, 95]] = True  # block 0 (positions 52..83): only future keys -> nothing visible
    mask[:, 0, 1, [10, 97]] = True  # block 1 (84..99): rows 84..96 see key 10, rows 97..99 both
    mask[:, 1, 0, [60]] = True  # rows 52..59 see nothing, 60.. see key 60
    mask[:, 1, 1] = torch.arange(lk) >= 20  # a long list with the future tail
    # head 2: all lists empty; head 3: a dense causal block
    mask[:, 3] = _random_mask(b, 1, lq, lk, bq, 1.0)[:, 0]
    sel = _from_position_mask(mask, bq, lq, lk)
    out, lse = _gather(q, k, v, sel, return_lse=True, chunk=16)
    ref_out, ref_lse = token_gather_attention(q, k, v, sel, return_lse=True)
    _close(out, ref_out, ATOL[dtype])
    _close_lse(lse, ref_lse)
    assert (out[:, 0, :32] == 0).all() and torch.isinf(lse[:, 0, :32]).all()
    assert torch.isfinite(lse[:, 0, 32:]).all()
    _close(
        out[:, 0, 32:45], v[:, 0, 10].unsqueeze(1).expand(b, 13, d), ATOL[dtype]
    )  # one key: out = v (head 0 reads KV head 0)
    assert (
        (out[:, 1, :8] == 0).all()
        and torch.isinf(lse[:, 1, :8]).all()
        and torch.isfinite(lse[:, 1, 8:]).all()
    )
    assert (out[:, 2] == 0).all() and torch.isinf(lse[:, 2]).all()
    assert not torch.isnan(out.float()).any() and not torch.isnan(lse).any()


# ----------------------------------------------------------------------------------------------
# Resumable state and merging
# ----------------------------------------------------------------------------------------------


def _split(mask, seed):
    """Two disjoint position masks whose union is `mask`."""
    g = torch.Generator().manual_seed(seed)
    coin = torch.rand(mask.shape, generator=g) < 0.5
    return mask & coin, mask & ~coin


@needs_kernel
@DTYPES
def test_resume_over_disjoint_sets_equals_union(dtype):
    b, hq, hkv, lq, lk, d, bq = 1, 4, 2, 100, 180, 64, 32
    q, k, v = _qkv(b, hq, hkv, lq, lk, d, dtype, seed=11)
    union = _random_mask(b, hq, lq, lk, bq, [0.8, 0.4, 0.2, 0.05], seed=12)
    mask_a, mask_b = _split(union, seed=13)
    mask_a[:, 3] = False  # head 3: the first pass sees nothing, the resumed pass everything
    union[:, 3] = mask_b[:, 3]
    sel_u, sel_a, sel_b = (_from_position_mask(m, bq, lq, lk) for m in (union, mask_a, mask_b))
    ref_out, ref_lse = token_gather_attention(q, k, v, sel_u, return_lse=True)

    state_a = _gather(q, k, v, sel_a, chunk=32, return_state=True)
    m, denom, acc = state_a
    assert m.dtype == denom.dtype == acc.dtype == torch.float32 and acc.shape == (b, hq, lq, d)
    assert torch.isinf(m[:, 3]).all() and (denom[:, 3] == 0).all()
    # the state alone finalises to the first pass's own result
    out_a, lse_a = _tg.finalize_state(state_a, dtype)
    ref_a, ref_lse_a = token_gather_attention(q, k, v, sel_a, return_lse=True)
    _close(out_a, ref_a, ATOL[dtype])
    _close_lse(lse_a, ref_lse_a)

    out, lse = _gather(q, k, v, sel_b, chunk=32, init_state=state_a, return_lse=True)
    _close(out, ref_out, ATOL[dtype])
    _close_lse(lse, ref_lse)
    state_ab = _gather(q, k, v, sel_b, chunk=32, init_state=state_a, return_state=True)
    out_ab, lse_ab = _tg.finalize_state(state_ab, dtype)
    _close(out_ab, ref_out, ATOL[dtype])
    _close_lse(lse_ab, ref_lse)

    # two normalised partial outputs merged by their log-sum-exps
    out_b, lse_b = _gather(q, k, v, sel_b, chunk=32, return_lse=True)
    out_m, lse_m = merge_partials(*_gather(q, k, v, sel_a, chunk=32, return_lse=True), out_b, lse_b)
    _close(out_m, ref_out, ATOL[dtype])
    _close_lse(lse_m, ref_lse)


@needs_kernel
@DTYPES
def test_block_sparse_pass_then_gather_pass(dtype):
    """AnchorAttention-style: a block-sparse pass (first key block + diagonal blocks, from the
    PyTorch block-sparse reference) continued by a gather pass over stripe tokens outside those
    blocks equals token-gather attention over the union."""
    b, hq, hkv, lq, lk, d, bq = 1, 4, 2, 96, 160, 64, 32
    q, k, v = _qkv(b, hq, hkv, lq, lk, d, dtype, seed=21)
    r, c = num_blocks(lq, bq), num_blocks(lk, bq)
    limit = _last_positions(lq, lk, bq) // bq + 1  # causal key-block limit per query block
    block_mask = torch.zeros(b, hq, r, c, dtype=torch.bool)
    block_mask[..., 0] = True
    block_mask |= torch.arange(c) == (limit - 1).view(1, 1, r, 1)
    block_sel = BlockSelection.from_block_mask(block_mask, bq, bq, lq, lk)
    block_sel.validate()
    in_blocks = block_mask.repeat_interleave(bq, -1)[..., :lk]  # position mask of the selected blocks
    stripes = _random_mask(b, hq, lq, lk, bq, [0.3, 0.1, 0.05, 0.0], seed=22) & ~in_blocks
    tok_sel = _from_position_mask(stripes, bq, lq, lk)
    union_sel = _from_position_mask(stripes | (in_blocks & _random_mask(b, hq, lq, lk, bq, 1.0)), bq, lq, lk)

    blk_out, blk_lse = block_sparse_attention(q, k, v, block_sel, return_lse=True)
    state = _tg.state_from_output(blk_out, blk_lse)
    out, lse = _gather(q, k, v, tok_sel, chunk=64, init_state=state, return_lse=True)
    ref_out, ref_lse = token_gather_attention(q, k, v, union_sel, return_lse=True)
    _close(out, ref_out, ATOL[dtype] * 2)  # the block pass's output was rounded to `dtype` once
    _close_lse(lse, ref_lse)


# ----------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------


@needs_kernel
def test_rejects_unsupported_inputs():
    q, k, v = _qkv(1, 2, 1, 40, 40, 48, torch.float32)
    sel = _from_position_mask(_random_mask(1, 2, 40, 40, 16, 0.5), 16, 40, 40)
    with pytest.raises(ValueError, match=r"head dim 48.*allowed head dims: \(16, 32, 64, 128, 256\)"):
        _gather(q, k, v, sel)
    q, k, v = _qkv(1, 2, 1, 40, 40, 32, torch.float32)
    with pytest.raises(ValueError, match=r"chunk 48 not supported; allowed: \(16, 32, 64, 128\)"):
        _gather(q, k, v, sel, chunk=48)
    sel8 = _from_position_mask(_random_mask(1, 2, 40, 40, 8, 0.5), 8, 40, 40)
    with pytest.raises(ValueError, match="block_q 8 not supported"):
        _gather(q, k, v, sel8)
    with pytest.raises(ValueError, match="kv_len"):
        _gather(q, k[:, :, :30], v[:, :, :30], sel)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        q3, _, _ = _qkv(1, 3, 1, 40, 40, 32, torch.float32)
        _gather(q3, torch.cat([k, k], 1), torch.cat([v, v], 1), sel)
    with pytest.raises(ValueError, match="init_state shapes"):
        _gather(
            q, k, v, sel, init_state=(torch.zeros(1, 2, 40), torch.zeros(1, 2, 40), torch.zeros(1, 2, 40, 16))
        )
    assert _tg.unsupported_reason(q, k, v, sel) is None
