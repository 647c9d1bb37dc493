"""The per-page log-sum-exp kernel (Recycled Attention's page ranking) under the Triton CPU interpreter,
against the float32 torch path: masks (left padding, per-key validity, a static cache's empty slots), page
sizes, head dims, GQA, and the device flag that skips the work."""

from __future__ import annotations

import pytest
import torch
from triton_interpreted import PACKAGE_DIR, interpret_env, load_interpreted

from attnpatch.estimators.page_lse import page_lse_torch

_pl, _SKIP_REASON = load_interpreted("page_lse_triton.py", PACKAGE_DIR / "estimators")
pytestmark = pytest.mark.skipif(_pl is None, reason=_SKIP_REASON or "")


@pytest.fixture(autouse=True)
def _interpreted():
    with interpret_env():
        yield


@pytest.mark.parametrize(("hq", "hkv", "d", "length", "page", "dtype"), [
    (4, 2, 16, 70, 16, torch.float32),     # G = 2, a partial last page, one tile per program
    (9, 3, 64, 1100, 16, torch.float16),   # SmolLM2's heads; two programs along the keys
    (4, 1, 256, 300, 128, torch.float32),  # Gemma 3's head dim; one page per tile
    (8, 8, 80, 200, 32, torch.float32),    # no GQA; a head dim that is not a power of two
])
def test_kernel_equals_the_torch_reference(hq, hkv, d, length, page, dtype):
    g = torch.Generator().manual_seed(hq * d + length)
    q = torch.randn(2, hq, 1, d, generator=g).to(dtype)
    k = torch.randn(2, hkv, length, d, generator=g).to(dtype)
    out = _pl.page_lse_triton(q, k, page, 0.3)
    assert out.shape == (2, hkv, hq // hkv, -(-length // page)) and out.dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    torch.testing.assert_close(out, page_lse_torch(q, k, page, 0.3), rtol=tol, atol=tol)


def test_masks_give_minus_inf_pages_and_match_the_reference():
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 4, 1, 32, generator=g), torch.randn(2, 2, 160, 32, generator=g)
    start = torch.tensor([0, 40])
    valid = torch.ones(2, 160, dtype=torch.bool)
    valid[:, 130:] = False  # a static cache's unwritten slots
    valid[0, 70] = False
    out = _pl.page_lse_triton(q, k, 16, 0.5, key_start=start, key_valid=valid)
    visible = valid & (torch.arange(160) >= start.view(2, 1))
    torch.testing.assert_close(out, page_lse_torch(q, k, 16, 0.5, visible), rtol=1e-5, atol=1e-5)
    assert out[1, :, :, :2].eq(float("-inf")).all() and out[:, :, :, 9].eq(float("-inf")).all()
    assert out[1, :, :, 2].isfinite().all()  # page 2 holds key 40, row 1's first


def test_a_zero_flag_skips_the_work_and_leaves_the_output_unwritten(monkeypatch):
    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(1, 4, 1, 16, generator=g), torch.randn(1, 2, 100, 16, generator=g)
    ref = page_lse_torch(q, k, 16, 1.0)
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: empty(*a, **kw).fill_(7.0))  # marks unwritten entries
    torch.testing.assert_close(_pl.page_lse_triton(q, k, 16, 1.0, flag=torch.tensor([1], dtype=torch.int32)), ref)
    skipped = _pl.page_lse_triton(q, k, 16, 1.0, flag=torch.tensor([0], dtype=torch.int32))
    assert skipped.shape == ref.shape and skipped.eq(7.0).all()


def test_declined_inputs_name_the_reason():
    q, k = torch.randn(1, 4, 1, 32), torch.randn(1, 2, 96, 32)
    assert "page size" in _pl.unsupported_reason(q, k, 8)
    assert "query heads" in _pl.unsupported_reason(torch.randn(1, 3, 1, 32), k, 16)
    assert "decode step" in _pl.unsupported_reason(torch.randn(1, 4, 2, 32), k, 16)
    with pytest.raises(ValueError, match="page_lse_triton: page size 8"):
        _pl.page_lse_triton(q, k, 8, 1.0)
