"""ProxyAttn's fused block-statistics kernel under the Triton CPU interpreter, against the torch path of
`proxy_scores`: GQA, chunked prefill, ragged lengths, left padding and other padding, sliding windows,
blocks 16-64, head dims 16 and 64, fp32 and fp16, several tiles and chunks."""

from __future__ import annotations

import pytest
import torch
from triton_interpreted import PACKAGE_DIR, interpret_env, load_interpreted

from attnpatch.estimators import proxy
from attnpatch.estimators.proxy import proxy_scores, proxy_scores_torch, sampled_rows
from attnpatch.sparsity import KeyBounds

_px, _SKIP_REASON = load_interpreted("proxy_triton.py", PACKAGE_DIR / "estimators")
pytestmark = pytest.mark.skipif(_px is None, reason=_SKIP_REASON or "")


@pytest.fixture(autouse=True)
def _interpreted():
    with interpret_env():
        yield


def _key_valid(lk: int) -> torch.Tensor:
    valid = torch.ones(2, lk, dtype=torch.bool)
    valid[0, 50:61] = False  # a hole inside the sequence
    valid[1, :70] = False  # left padding: the first query blocks see nothing
    return valid


# name: (Hq, Hkv, Lq, Lk, D, block, sample, bounds, dtype, tile rows, output elements per chunk)
CASES = {
    "gqa-ragged": (4, 2, 200, 200, 16, 16, 5, KeyBounds(), torch.float32, 16, 1 << 28),
    "chunked-left-padding": (4, 2, 77, 203, 16, 32, 4, KeyBounds(key_start=torch.tensor([0, 37])), torch.float32,
                             16, 1 << 28),
    "key-valid-chunks": (4, 2, 150, 150, 16, 32, 4, KeyBounds(key_valid=_key_valid(150)), torch.float32, 16, 2000),
    "window": (4, 2, 150, 150, 16, 16, 3, KeyBounds(window=40), torch.float32, 16, 1 << 28),
    "chunked-window": (3, 1, 60, 190, 16, 64, 8, KeyBounds(window=50), torch.float32, 32, 1 << 28),
    "mha-d64": (2, 2, 130, 130, 64, 32, 8, KeyBounds(), torch.float32, 64, 1 << 28),
    "fp16-gqa-padding": (4, 2, 180, 180, 64, 32, 8, KeyBounds(key_start=torch.tensor([0, 21])), torch.float16,
                         32, 1 << 28),
}


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_equals_the_torch_path(name):
    hq, hkv, lq, lk, d, block, sample, bounds, dtype, tile, chunk = CASES[name]
    g = torch.Generator().manual_seed(lq * 7 + lk)
    q = (torch.randn(2, hq, lq, d, generator=g) * 2).to(dtype)
    k = torch.randn(2, hkv, lk, d, generator=g).to(dtype)
    scale = d ** -0.5
    rows = sampled_rows(lq, block, sample)
    got = _px.proxy_scores_triton(q, k, bounds, scale, block, rows, tile_rows=tile, out_elements=chunk)
    want = proxy_scores_torch(q, k, bounds, scale, block, sample)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape and a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    assert (want[1] > 0).any() and (want[1] == 0).any()  # the case scores something and hides something


def test_declined_inputs():
    q, k = torch.randn(1, 4, 32, 16), torch.randn(1, 2, 32, 16)
    plain = KeyBounds()
    assert _px.unsupported_reason(q, k, plain, 16) is None
    assert "dtype" in _px.unsupported_reason(q.double(), k.double(), plain, 16)
    assert "differ" in _px.unsupported_reason(q, k.half(), plain, 16)
    assert "head dim" in _px.unsupported_reason(torch.randn(1, 4, 32, 512), torch.randn(1, 2, 32, 512), plain, 16)
    assert "multiple" in _px.unsupported_reason(torch.randn(1, 3, 32, 16), k, plain, 16)
    assert "more queries" in _px.unsupported_reason(torch.randn(1, 4, 40, 16), k, plain, 16)
    assert "tensor attention mask" in _px.unsupported_reason(q, k, KeyBounds(mask=torch.ones(1, 1, 32, 32).bool()), 16)
    assert "power of two" in _px.unsupported_reason(q, k, plain, 48)
    with pytest.raises(ValueError, match="power of two"):
        _px.proxy_scores_triton(q, k, plain, 0.25, 48, sampled_rows(32, 48, 4))


def test_dispatcher(monkeypatch):
    """The package's own kernel module is not interpreted on a CPU machine: the dispatcher runs the torch
    path there; with the interpreted module it runs the kernel."""
    q, k = torch.randn(1, 4, 70, 16), torch.randn(1, 2, 70, 16)
    ref = proxy_scores_torch(q, k, KeyBounds(), 0.25, 16, 4)
    if proxy.proxy_triton.unsupported_reason(q, k, KeyBounds(), 16) is not None:
        for a, b in zip(proxy_scores(q, k, KeyBounds(), 0.25, 16, 4), ref, strict=True):
            torch.testing.assert_close(a, b)
    calls = []
    kernel = _px.proxy_scores_triton
    monkeypatch.setattr(_px, "proxy_scores_triton", lambda *a: calls.append(1) or kernel(*a))
    monkeypatch.setattr(proxy, "proxy_triton", _px)
    for a, b in zip(proxy_scores(q, k, KeyBounds(), 0.25, 16, 4), ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert calls == [1]
