"""Quest's fused page-bound kernel under the Triton CPU interpreter, against the float32 torch path."""

from __future__ import annotations

import pytest
import torch
from triton_interpreted import PACKAGE_DIR, interpret_env, load_interpreted

from attnpatch.cache import key_page_bounds
from attnpatch.estimators.page_bounds import page_upper_bounds, page_upper_bounds_torch

_pb, _SKIP_REASON = load_interpreted("page_bounds_triton.py", PACKAGE_DIR / "estimators")
pytestmark = pytest.mark.skipif(_pb is None, reason=_SKIP_REASON or "")


@pytest.fixture(autouse=True)
def _interpreted():
    with interpret_env():
        yield


@pytest.mark.parametrize(("hq", "hkv", "d", "length", "dtype"), [
    (4, 2, 16, 70, torch.float32),     # G = 2, a partial last page
    (9, 3, 64, 1000, torch.float16),   # SmolLM2's heads; more than one block of pages
    (4, 1, 256, 300, torch.float32),   # Gemma 3's head dim
    (8, 8, 80, 129, torch.float32),    # no GQA; a head dim that is not a power of two
])
def test_kernel_equals_the_torch_bound(hq, hkv, d, length, dtype):
    g = torch.Generator().manual_seed(hq * d + length)
    q = torch.randn(2, hq, 1, d, generator=g).to(dtype)
    k = torch.randn(2, hkv, length, d, generator=g).to(dtype)
    lo, hi = key_page_bounds(k, 16)
    n = lo.shape[2] - 1  # the first n pages of a larger (static) table
    out = _pb.page_upper_bounds_triton(q, lo, hi, n, 0.5)
    assert out.shape == (2, hkv, hq // hkv, n) and out.dtype == torch.float32
    ref = page_upper_bounds_torch(q, lo[:, :, :n], hi[:, :, :n]) * 0.5
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("config", ["16,2", "256,8"])
def test_launch_override_keeps_the_bound(config, monkeypatch):
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 4, 1, 32, generator=g)
    lo, hi = key_page_bounds(torch.randn(2, 2, 1000, 32, generator=g), 16)
    monkeypatch.setenv("ATTNPATCH_BOUNDS_CONFIG", config)
    assert _pb.launch_config() == tuple(int(x) for x in config.split(","))
    torch.testing.assert_close(_pb.page_upper_bounds_triton(q, lo, hi, lo.shape[2], 1.0),
                               page_upper_bounds_torch(q, lo, hi), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", ["64", "48,4", "x,y"])
def test_launch_override_is_checked(bad, monkeypatch):
    monkeypatch.setenv("ATTNPATCH_BOUNDS_CONFIG", bad)
    with pytest.raises(ValueError, match="ATTNPATCH_BOUNDS_CONFIG"):
        _pb.launch_config()


def test_strided_tables_and_declined_inputs():
    q, k = torch.randn(1, 4, 1, 32), torch.randn(1, 2, 96, 32)
    lo, hi = key_page_bounds(k, 16)
    wide_lo, wide_hi = torch.zeros(1, 2, 10, 32), torch.zeros(1, 2, 10, 32)  # a static table's first pages
    wide_lo[:, :, :6], wide_hi[:, :, :6] = lo, hi
    torch.testing.assert_close(_pb.page_upper_bounds_triton(q, wide_lo, wide_hi, 6, 1.0),
                               page_upper_bounds_torch(q, lo, hi), rtol=1e-5, atol=1e-5)
    assert "query positions" in _pb.unsupported_reason(torch.randn(1, 4, 2, 32), lo, hi)
    assert "multiple" in _pb.unsupported_reason(torch.randn(1, 3, 1, 32), lo, hi)
    assert "dtype" in _pb.unsupported_reason(q, lo.double(), hi.double())
    with pytest.raises(ValueError, match="query positions"):
        _pb.page_upper_bounds_triton(torch.randn(1, 4, 2, 32), lo, hi, 6, 1.0)


def test_dispatcher_falls_back_with_the_reason():
    """Not interpreted here (the package's own kernel module was decorated without the interpreter on a
    CPU machine): the torch path runs, and asking for the kernel names why it cannot."""
    q, k = torch.randn(1, 4, 1, 32), torch.randn(1, 2, 96, 32)
    lo, hi = key_page_bounds(k, 16)
    torch.testing.assert_close(page_upper_bounds(q, lo, hi, 4, 2.0, use_kernel=False),
                               page_upper_bounds_torch(q, lo[:, :, :4], hi[:, :, :4]) * 2.0)
    from attnpatch.estimators import page_bounds_triton

    if page_bounds_triton.unsupported_reason(q, lo, hi) is not None:
        with pytest.raises(ValueError, match="cannot run"):
            page_upper_bounds(q, lo, hi, use_kernel=True)
