"""XAttention's fused antidiagonal kernel under the Triton CPU interpreter, against the torch path of
`antidiagonal_block_scores`: GQA, chunked prefill, ragged lengths, left padding and other padding,
sliding windows, strides 4 / 8 / 16 with blocks 16-64, head dims 16 and 64, fp32 and fp16."""

from __future__ import annotations

import pytest
import torch
from triton_interpreted import PACKAGE_DIR, interpret_env, load_interpreted

from attnpatch.estimators import antidiagonal
from attnpatch.estimators.antidiagonal import antidiagonal_block_scores, antidiagonal_block_scores_torch
from attnpatch.sparsity import KeyBounds

_ad, _SKIP_REASON = load_interpreted("antidiagonal_triton.py", PACKAGE_DIR / "estimators")
pytestmark = pytest.mark.skipif(_ad is None, reason=_SKIP_REASON or "")

SMALL = (16, 16)  # tiles of 16 groups: several query and key tiles at these lengths (skipping exercised)


@pytest.fixture(autouse=True)
def _interpreted():
    with interpret_env():
        yield


def _key_valid(lk: int) -> torch.Tensor:
    valid = torch.ones(2, lk, dtype=torch.bool)
    valid[0, 50:61] = False  # a hole: one key group without a real key, two partial ones
    valid[1, :70] = False  # left padding: the first query groups score nothing
    return valid


# name: (Hq, Hkv, Lq, Lk, D, block, stride, bounds, dtype, tiles)
CASES = {
    "gqa-ragged": (4, 2, 200, 200, 16, 16, 4, KeyBounds(), torch.float32, SMALL),
    "chunked-left-padding": (4, 2, 77, 203, 16, 32, 8, KeyBounds(key_start=torch.tensor([0, 37])), torch.float32,
                             SMALL),
    "padded-queries": (4, 2, 150, 150, 64, 32, 4, KeyBounds(key_start=torch.tensor([5, 100])), torch.float32, None),
    "key-valid": (4, 2, 150, 150, 16, 32, 4, KeyBounds(key_valid=_key_valid(150)), torch.float32, SMALL),
    "window": (4, 2, 150, 150, 16, 16, 4, KeyBounds(window=40), torch.float32, SMALL),
    "chunked-window": (3, 1, 60, 190, 16, 64, 8, KeyBounds(window=50), torch.float32, SMALL),
    "stride16-b64": (4, 2, 300, 300, 64, 64, 16, KeyBounds(), torch.float32, None),
    "stride16-b16": (2, 2, 130, 130, 16, 16, 16, KeyBounds(), torch.float32, SMALL),
    "fp16-gqa-padding": (4, 2, 180, 180, 64, 32, 8, KeyBounds(key_start=torch.tensor([0, 21])), torch.float16,
                         None),
    "fp16-chunked": (4, 1, 45, 100, 16, 16, 4, KeyBounds(), torch.float16, SMALL),
}


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_equals_the_torch_path(name):
    hq, hkv, lq, lk, d, block, stride, bounds, dtype, tiles = CASES[name]
    g = torch.Generator().manual_seed(lq * 7 + lk)
    q = torch.randn(2, hq, lq, d, generator=g).to(dtype)
    k = torch.randn(2, hkv, lk, d, generator=g).to(dtype)
    scale = d ** -0.5
    out = _ad.antidiagonal_block_scores_triton(q, k, scale, bounds, block, stride, tiles=tiles)
    ref = antidiagonal_block_scores_torch(q, k, scale, bounds, block, stride)
    assert out.shape == ref.shape and out.dtype == torch.float32
    tol = 1e-4 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    assert (ref.sum(-1) > 0).any() and (ref == 0).any()  # the case scores something and masks something


def test_declined_inputs():
    q, k = torch.randn(1, 4, 32, 16), torch.randn(1, 2, 32, 16)
    assert _ad.unsupported_reason(q, k, 16, 4) is None
    assert "dtype" in _ad.unsupported_reason(q.double(), k.double(), 16, 4)
    assert "differ" in _ad.unsupported_reason(q, k.half(), 16, 4)
    assert "powers of two" in _ad.unsupported_reason(q, k, 48, 6)
    assert "powers of two" in _ad.unsupported_reason(q, k, 16, 32)
    assert "head dim" in _ad.unsupported_reason(torch.randn(1, 4, 32, 512), torch.randn(1, 2, 32, 512), 16, 4)
    assert "multiple" in _ad.unsupported_reason(torch.randn(1, 3, 32, 16), k, 16, 4)
    assert "more queries" in _ad.unsupported_reason(torch.randn(1, 4, 40, 16), k, 16, 4)
    with pytest.raises(ValueError, match="powers of two"):
        _ad.antidiagonal_block_scores_triton(q, k, 0.25, KeyBounds(), 48, 6)


def test_dispatcher(monkeypatch):
    """The package's own kernel module is not interpreted on a CPU machine: the dispatcher runs the torch
    path there; with the interpreted module it runs the kernel."""
    q, k = torch.randn(1, 4, 70, 16), torch.randn(1, 2, 70, 16)
    ref = antidiagonal_block_scores_torch(q, k, 0.25, KeyBounds(), 16, 4)
    if antidiagonal.antidiagonal_triton.unsupported_reason(q, k, 16, 4) is not None:
        torch.testing.assert_close(antidiagonal_block_scores(q, k, 0.25, KeyBounds(), 16, 4), ref)
    calls = []
    kernel = _ad.antidiagonal_block_scores_triton
    monkeypatch.setattr(_ad, "antidiagonal_block_scores_triton", lambda *a: calls.append(1) or kernel(*a))
    monkeypatch.setattr(antidiagonal, "antidiagonal_triton", _ad)
    torch.testing.assert_close(antidiagonal_block_scores(q, k, 0.25, KeyBounds(), 16, 4), ref, rtol=1e-4, atol=1e-4)
    assert calls == [1]
    with pytest.raises(ValueError, match="multiple of the stride"):
        antidiagonal_block_scores(q, k, 0.25, KeyBounds(), 16, 32)
