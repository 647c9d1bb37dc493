"""ProxyAttn's fused budget-and-rank kernel under the Triton CPU interpreter: the block scores `k − rank` of
`proxy_block_scores_triton` (statistics kernel + budget kernel) against the torch path (`proxy_scores_torch`,
`coverage_budget`, `rank_blocks`) — GQA, chunked prefill, padding, windows, per-head γ / min / max,
ties, several chunks — and the bitonic sort on its own."""

from __future__ import annotations

import pytest
import torch
from triton_interpreted import PACKAGE_DIR, interpret_env, load_interpreted

from attnpatch.estimators import proxy
from attnpatch.estimators.proxy import coverage_budget, proxy_scores_torch, rank_blocks, sampled_rows
from attnpatch.sparsity import KeyBounds, num_blocks
from attnpatch.sparsity.regions import allowed_blocks

_pb, _SKIP_REASON = load_interpreted("proxy_budget_triton.py", PACKAGE_DIR / "estimators")
_px, _ = load_interpreted("proxy_triton.py", PACKAGE_DIR / "estimators") if _pb is not None else (None, None)
pytestmark = pytest.mark.skipif(_pb is None, reason=_SKIP_REASON or "")


@pytest.fixture(autouse=True)
def _interpreted(monkeypatch):
    """The interpreted statistics module calls the interpreted budget kernel."""
    monkeypatch.setattr(_px, "budget_scores_triton", _pb.budget_scores_triton)
    monkeypatch.setattr(_px, "budget_unsupported_reason", _pb.unsupported_reason)
    with interpret_env():
        yield


def _torch_scores(q, k, bounds, scale, block, sample, allowed, gamma, lo, hi):
    p, mass = proxy_scores_torch(q, k, bounds, scale, block, sample)
    rank = rank_blocks(p, allowed).repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return coverage_budget(mass, gamma, lo, hi).unsqueeze(-1) - rank.float()


def _padding(lk: int) -> torch.Tensor:
    valid = torch.ones(2, lk, dtype=torch.bool)
    valid[0, 40:75] = False
    valid[1, :50] = False
    return valid


# name: (Hq, Hkv, Lq, Lk, block, sample, bounds, output elements per chunk)
CASES = {
    "gqa-ragged": (4, 2, 300, 300, 16, 5, KeyBounds(), 1 << 28),
    "chunked-left-padding": (4, 2, 90, 250, 16, 4, KeyBounds(key_start=torch.tensor([0, 37])), 1 << 28),
    "key-valid-chunks": (4, 2, 200, 200, 16, 3, KeyBounds(key_valid=_padding(200)), 3000),
    "window": (6, 2, 260, 260, 16, 4, KeyBounds(window=70), 1 << 28),
    "mha-block32": (2, 2, 190, 190, 32, 8, KeyBounds(), 1 << 28),
}


@pytest.mark.parametrize("name", list(CASES))
def test_fused_scores_equal_the_torch_path(name):
    hq, hkv, lq, lk, block, sample, bounds, chunk = CASES[name]
    g = torch.Generator().manual_seed(lq + 13 * lk)
    q = torch.randn(2, hq, lq, 16, generator=g) * 2
    k = torch.randn(2, hkv, lk, 16, generator=g)
    allowed = allowed_blocks(2, lq, lk, block, block, bounds, None)
    gamma = torch.linspace(0.6, 0.95, hq)
    lo = torch.tensor([0.0, 1.5] * (hq // 2))
    hi = torch.tensor([1e6, 4.0] * (hq // 2))
    rows = sampled_rows(lq, block, sample)
    got = _px.proxy_block_scores_triton(q, k, bounds, 0.25, block, rows, allowed, gamma, lo, hi, tile_rows=16,
                                        out_elements=chunk)
    want = _torch_scores(q, k, bounds, 0.25, block, sample, allowed, gamma, lo, hi)
    assert got.shape == want.shape == (2, hq, num_blocks(lq, block), num_blocks(lk, block))
    keep_got, keep_want = (got >= 1) & allowed, (want >= 1) & allowed
    # the ranks are exact; a budget may differ by one block where a prefix sum meets γ · total within rounding
    assert (got - want)[allowed.expand_as(got)].abs().max() <= 1
    assert (keep_got != keep_want).float().mean() < 0.01
    assert torch.equal(got[allowed.expand_as(got)].frac(), want[allowed.expand_as(want)].frac())
    assert keep_want.any() and (~keep_want & allowed).any()  # the case keeps some blocks and drops others


def test_ties_go_to_the_lower_block_and_budgets_clamp():
    """Equal proxy scores rank by column; `lo` wins over `hi` and fractions round up."""
    b, hkv, g, s, nr, cc = 1, 1, 2, 3, 2, 8
    per = s + g
    val = torch.zeros(b, hkv, cc, nr * per)
    val[0, 0, :, 0] = torch.tensor([0.1, 0.3, 0.3, 0.0, 0.3, 0.05, 0.2, 0.05])  # block 0: proxy row 0
    val[0, 0, :, per + 1] = torch.tensor([0.5, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05, 0.0])  # block 1: proxy row 1
    val[0, 0, :, s] = torch.tensor([0.7, 0.1, 0.1, 0.05, 0.05, 0.0, 0.0, 0.0])  # block 0, head 0's mass
    val[0, 0, :, per + s + 1] = 1.0 / cc  # block 1, head 1: flat mass
    allowed = torch.ones(1, 1, nr, cc, dtype=torch.bool)
    allowed[0, 0, 0, 7] = False
    gamma, lo, hi = torch.tensor([0.75, 0.5]), torch.tensor([0.0, 5.5]), torch.tensor([10.0, 2.0])
    out = torch.empty(b, g, nr, cc)
    _pb.budget_scores_triton(val, allowed, gamma, lo, hi, out, 0, s)
    # block 0's proxy: 0.3 at columns 1, 2, 4 (in that order), then 0.2 (6), 0.1 (0), 0.05 (5), 0 (3); 7 last
    # head 0's mass reaches γ = 0.75 of its total with its 2 largest blocks (0.7 + 0.1)
    assert out[0, 0, 0].tolist() == [2 - r for r in (4, 0, 1, 6, 2, 5, 3, 7)]
    # head 1 at block 0 has no mass: budget = max(min(0, 2), 5.5) rounded up = 6
    assert out[0, 1, 0].tolist() == [6 - r for r in (4, 0, 1, 6, 2, 5, 3, 7)]
    # block 1, head 1: flat mass 1/8, γ = 0.5 → 4 blocks, clamped to hi 2 and then lo 5.5 → 6
    assert out[0, 1, 1, 0].item() == 6


def test_sort_network():
    import triton
    import triton.language as tl

    with interpret_env():
        @triton.jit
        def kernel(x_ptr, y_ptr, LOG2: tl.constexpr):
            lanes = tl.arange(0, 1 << LOG2)
            tl.store(y_ptr + lanes, _pb._sorted_descending(tl.load(x_ptr + lanes), LOG2))

        g = torch.Generator().manual_seed(0)
        for log2 in (0, 1, 3, 6):
            x = torch.randn(1 << log2, generator=g)
            x[::3] = float("-inf")
            y = torch.empty_like(x)
            kernel[(1,)](x, y, LOG2=log2)
            assert torch.equal(y, x.sort(descending=True).values)
            xi = torch.randint(-(1 << 40), 1 << 40, (1 << log2,), generator=g)
            yi = torch.empty_like(xi)
            kernel[(1,)](xi, yi, LOG2=log2)
            assert torch.equal(yi, xi.sort(descending=True).values)


def test_declines_and_dispatch(monkeypatch):
    assert _pb.unsupported_reason(0, torch.zeros(1)) is not None
    assert "key blocks" in _pb.unsupported_reason(_pb.MAX_COLS + 1, torch.zeros(1))
    assert _pb.unsupported_reason(64, torch.zeros(1)) is None
    q, k = torch.randn(1, 4, 64, 16), torch.randn(1, 2, 64, 16)
    allowed = allowed_blocks(1, 64, 64, 16, 16, KeyBounds(), None)
    args = (torch.full((4,), 0.9), torch.zeros(4), torch.full((4,), 1e6))
    calls = []
    monkeypatch.setattr(proxy, "proxy_triton", _px)
    real = _px.proxy_block_scores_triton
    monkeypatch.setattr(_px, "proxy_block_scores_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    fused = proxy.proxy_block_scores(q, k, KeyBounds(), 0.25, 16, 4, allowed, *args)
    assert calls == [1]
    want = _torch_scores(q, k, KeyBounds(), 0.25, 16, 4, allowed, *args)
    assert (fused - want)[allowed.expand_as(want)].abs().max() <= 1
