"""The fused Triton estimate of `sale` (attnpatch/estimators/lowbit_triton.py, CPU interpreter) equals the
torch path of `relative_block_scores`: GQA, ragged lengths, chunked prefill, left padding, sliding
windows, 8 and 4 bits, rows without a reference key, the int8 and fp16 dot paths; and what it declines."""

import pytest
import torch
from triton_interpreted import PACKAGE_DIR, interpret_env, load_interpreted

from attnpatch.estimators import lowbit
from attnpatch.estimators.lowbit import lowbit_operands, relative_block_scores
from attnpatch.methods.base import PrefillContext
from attnpatch.methods.prefill.sale import Sale
from attnpatch.sparsity import KeyBounds
from attnpatch.sparsity.regions import forced_blocks

_lt, _SKIP_REASON = load_interpreted("lowbit_triton.py", PACKAGE_DIR / "estimators")
pytestmark = pytest.mark.skipif(_SKIP_REASON is not None, reason=_SKIP_REASON or "")

SCALE = 0.25
BOUNDS = {
    "plain": KeyBounds(),
    "left-padded": KeyBounds(key_start=torch.tensor([0, 30])),  # batch 1: its first 30 queries see nothing
    "window": KeyBounds(window=40),
    "padded-window": KeyBounds(key_start=torch.tensor([5, 50]), window=24),
}


@pytest.fixture(autouse=True, scope="module")
def _interpret_while_testing():
    with interpret_env():
        yield


def _inputs(hq, hkv, lq, lk, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, hq, lq, d, generator=g).to(dtype)
    k = torch.randn(2, hkv, lk, d, generator=g).to(dtype)
    return q, k


def _check(q, k, bounds, block, forced, bits):
    want = relative_block_scores(q, k, bounds, SCALE, block, forced, bits, use_kernel=False)
    assert _lt.unsupported_reason(q, k, bounds, block) is None
    ops = lowbit_operands(q, k, bounds, SCALE, block, forced, bits)
    got = _lt.relative_block_scores_triton(*ops, bounds=bounds, scale=SCALE, block=block)
    assert torch.equal(got == 0, want == 0) and torch.equal(got.isinf(), want.isinf())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    return want


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("name", list(BOUNDS))
@pytest.mark.parametrize(("hq", "hkv"), [(4, 4), (8, 2)], ids=["mha", "gqa4"])
@pytest.mark.parametrize(("lq", "lk"), [(77, 77), (40, 101)], ids=["prefill", "chunked"])
def test_kernel_equals_the_torch_path(lq, lk, hq, hkv, name, bits):
    q, k = _inputs(hq, hkv, lq, lk, 32, torch.float32, seed=lq + hq)
    bounds = BOUNDS[name]
    want = _check(q, k, bounds, 16, forced_blocks(2, lq, lk, 16, 16, bounds, 1, 2), bits)
    assert (want > 0).any() and (want == 0).any()


@pytest.mark.parametrize(("d", "block", "dtype"), [(16, 16, torch.float16), (64, 32, torch.float16),
                                                  (32, 32, torch.float32)], ids=["d16-fp16dot", "d64", "d32-b32"])
def test_head_dims_blocks_and_dtypes(d, block, dtype):
    q, k = _inputs(4, 2, 70, 90, d, dtype, seed=d)
    bounds = BOUNDS["padded-window"]
    _check(q, k, bounds, block, forced_blocks(2, 70, 90, block, block, bounds, 1, 1), 8)


def test_rows_without_reference_score_inf_where_they_see_a_key():
    q, k = _inputs(4, 2, 77, 77, 32, torch.float32, seed=3)
    bounds = BOUNDS["left-padded"]
    forced = forced_blocks(2, 77, 77, 16, 16, bounds, 1, 1).clone()
    forced[:, :, 3] = False  # query block 3 has no reference at all
    want = _check(q, k, bounds, 16, forced, 8)
    assert want[0, :, 3, :4].isinf().all() and want[1, :, 3, 1:4].isinf().all()  # batch 1 sees keys 30..
    assert not want[1, :, 3, 0].any() and not want[:, :, 3, 4:].any()


def test_relative_block_scores_runs_the_kernel_where_it_takes_the_input(monkeypatch):
    q, k = _inputs(8, 2, 77, 77, 32, torch.float32, seed=7)
    ctx = PrefillContext(0, SCALE, BOUNDS["left-padded"], None)
    sale = Sale(block_size=16, local_window=16, min_length=0, tau=(0.0, 0.01, 0.05, 0.2) * 2)
    want, sel_want = relative_block_scores(q, k, ctx.bounds, SCALE, 16, _forced(ctx), 8), sale.select(q, k, ctx)
    monkeypatch.setattr(lowbit, "lowbit_triton", _lt)
    calls = []
    monkeypatch.setattr(_lt, "relative_block_scores_triton", _counted(_lt.relative_block_scores_triton, calls))
    got = relative_block_scores(q, k, ctx.bounds, SCALE, 16, _forced(ctx), 8)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    assert torch.equal(sale.select(q, k, ctx).to_block_mask(), sel_want.to_block_mask()) and len(calls) == 2


def test_what_the_kernel_declines():
    q, k = _inputs(4, 2, 40, 40, 32, torch.float32)
    valid = KeyBounds(key_valid=torch.arange(40).view(1, -1).expand(2, -1) % 13 != 5)
    assert "key_valid" in _lt.unsupported_reason(q, k, valid, 16)
    assert "tensor mask" in _lt.unsupported_reason(q, k, KeyBounds(mask=valid.dense_mask(2, 40, 40)), 16)
    assert "head dim 24" in _lt.unsupported_reason(q[..., :24], k[..., :24], KeyBounds(), 16)
    assert "block size 48" in _lt.unsupported_reason(q, k, KeyBounds(), 48)
    # the package's own (compiled) module never takes CPU tensors: the torch path runs, or use_kernel=True raises
    assert "device cpu" in lowbit.lowbit_triton.unsupported_reason(q, k, KeyBounds(), 16)
    forced = forced_blocks(2, 40, 40, 16, 16, KeyBounds(), 1, 1)
    with pytest.raises(ValueError, match="declines: device cpu"):
        relative_block_scores(q, k, KeyBounds(), SCALE, 16, forced, use_kernel=True)
    # declined inputs still score on the torch path
    torch.testing.assert_close(relative_block_scores(q, k, valid, SCALE, 16, forced),
                               relative_block_scores(q, k, valid, SCALE, 16, forced, use_kernel=False))


def _forced(ctx):
    return forced_blocks(2, 77, 77, 16, 16, ctx.bounds, 1, 1)


def _counted(fn, calls):
    def wrapper(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)
    return wrapper
