"""The CPU path of the reference backend (`backends/reference/masked_sdpa.py`) against the gather executor it
stands in for: random block selections with GQA, shared selections, chunked prefill, padding, windows, a
tensor mask, query blocks that see nothing, several chunks; and when the backend uses it."""

from __future__ import annotations

import pytest
import torch

from attnpatch.backends.reference import masked_sdpa
from attnpatch.backends.reference.backend import ReferenceBackend
from attnpatch.backends.reference.executors import block_sparse_attention
from attnpatch.bench.selections import bernoulli_block_selection
from attnpatch.sparsity import BlockSelection, KeyBounds, SkipRule


def _selection(b, h, lq, lk, bq, bk, density, seed, shared=False) -> BlockSelection:
    return bernoulli_block_selection(b, h, lq, lk, bq, bk, density, seed, shared)


def _key_valid(b, lk):
    valid = torch.ones(b, lk, dtype=torch.bool)
    valid[0, 10:30] = False
    valid[-1, :45] = False
    return valid


# name: (B, Hq, Hkv, Lq, Lk, block_q, block_k, bounds, shared, chunk bytes)
CASES = {
    "gqa": (2, 6, 2, 150, 150, 16, 16, KeyBounds(), False, 1 << 26),
    "shared-chunks": (2, 4, 2, 130, 130, 32, 16, KeyBounds(), True, 4000),
    "chunked-prefill-left-padding": (2, 4, 1, 70, 200, 16, 32, KeyBounds(key_start=torch.tensor([0, 33])), False,
                                     1 << 26),
    "key-valid": (2, 4, 2, 120, 120, 16, 16, KeyBounds(key_valid=_key_valid(2, 120)), False, 6000),
    "window": (1, 4, 4, 160, 160, 32, 32, KeyBounds(window=50), False, 1 << 26),
}


@pytest.mark.parametrize("name", list(CASES))
def test_equals_the_gather_executor(name, monkeypatch):
    b, hq, hkv, lq, lk, bq, bk, bounds, shared, chunk = CASES[name]
    monkeypatch.setattr(masked_sdpa, "CHUNK_BYTES", chunk)
    g = torch.Generator().manual_seed(lq + lk)
    q, k, v = (torch.randn(b, h, n, 16, generator=g) for h, n in ((hq, lq), (hkv, lk), (hkv, lk)))
    sel = _selection(b, hq, lq, lk, bq, bk, 0.4, lq, shared)
    got = masked_sdpa.masked_sdpa_attention(q, k, v, sel, 0.3, bounds)
    want = block_sparse_attention(q, k, v, sel, 0.3, bounds=bounds)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (want == 0).all(-1).any() and (want != 0).any()  # some rows see nothing, others something


def test_tensor_mask():
    b, h, lq, lk = 1, 2, 64, 96
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(b, h, lq, 16, generator=g), torch.randn(b, h, lk, 16, generator=g), torch.randn(b, h, lk, 16)
    mask = torch.rand(b, 1, lq, lk, generator=g) < 0.7
    sel = _selection(b, h, lq, lk, 16, 16, 0.5, 3)
    bounds = KeyBounds(mask=mask)
    torch.testing.assert_close(masked_sdpa.masked_sdpa_attention(q, k, v, sel, 0.25, bounds),
                               block_sparse_attention(q, k, v, sel, 0.25, bounds=bounds), rtol=1e-5, atol=1e-5)


def test_when_the_backend_uses_it(monkeypatch):
    q, k, v = torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16)
    sel = _selection(1, 2, 64, 64, 16, 16, 0.5, 1)
    calls = []
    real = masked_sdpa.masked_sdpa_attention
    monkeypatch.setattr(masked_sdpa, "masked_sdpa_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    counts = torch.zeros(2, dtype=torch.int64)
    ReferenceBackend().prefill(q, k, v, sel, scale=0.25, bounds=KeyBounds(), tile_counts=counts)
    assert calls == [1] and counts[0] == sel.counts.sum()
    skip = BlockSelection(sel.indices, sel.counts, 16, 16, 64, 64, SkipRule(-5.0))
    ReferenceBackend().prefill(q, k, v, skip, scale=0.25, bounds=KeyBounds())
    ReferenceBackend().prefill(q.requires_grad_(), k, v, sel, scale=0.25, bounds=KeyBounds())
    assert calls == [1]  # skip rules and autograd keep the gather executor
    assert "skip" in masked_sdpa.unsupported_reason(q, skip)
    assert "log-sum-exp" in masked_sdpa.unsupported_reason(q, sel, return_lse=True)
