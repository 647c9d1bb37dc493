"""GPU: ProxyAttn's fused block-statistics kernel (attnpatch/estimators/proxy_triton.py, compiled) against
the torch path of `proxy_scores`, and its budget kernel (proxy_budget_triton.py) against `coverage_budget` and
`rank_blocks` (skipped without CUDA). Its speed: `attnpatch.bench.methods`."""

from __future__ import annotations

import pytest
import torch

from attnpatch.estimators import proxy_triton
from attnpatch.estimators.proxy import coverage_budget, proxy_scores_torch, rank_blocks, sampled_rows
from attnpatch.sparsity import KeyBounds
from attnpatch.sparsity.regions import allowed_blocks

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEVICE = torch.device("cuda")

# name: (B, Hq, Hkv, Lq, Lk, D, block, sample, bounds)
CASES = {
    "8k-gqa-b128": (1, 32, 8, 8192, 8192, 128, 128, 16, KeyBounds()),
    "b64-ragged": (1, 8, 2, 3000, 3000, 128, 64, 8, KeyBounds()),
    "d256-gemma": (1, 4, 1, 2048, 2048, 256, 128, 16, KeyBounds()),
    "chunked-left-padding": (2, 8, 2, 1000, 4096, 128, 64, 16, KeyBounds(key_start=torch.tensor([0, 700]))),
    "window": (1, 8, 2, 4096, 4096, 128, 128, 16, KeyBounds(window=1000)),
    "d64-b32": (1, 9, 3, 999, 999, 64, 32, 8, KeyBounds()),
}


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_equals_the_torch_path(name):
    b, hq, hkv, lq, lk, d, block, sample, bounds = CASES[name]
    g = torch.Generator(device=DEVICE).manual_seed(lq + d)
    q = torch.randn(b, hq, lq, d, device=DEVICE, dtype=torch.bfloat16, generator=g)
    k = torch.randn(b, hkv, lk, d, device=DEVICE, dtype=torch.bfloat16, generator=g)
    assert proxy_triton.unsupported_reason(q, k, bounds, block) is None
    scale = d ** -0.5
    got = proxy_triton.proxy_scores_triton(q, k, bounds, scale, block, sampled_rows(lq, block, sample, DEVICE))
    # The torch path's bf16 GEMM rounds the scores to 8 bits (the kernel accumulates in float32): compare
    # with the torch path on float32 inputs (the proxy query rounded to bf16 as the kernel takes it).
    want = proxy_scores_torch(q.float(), k.float(), bounds, scale, block, sample)
    for a, w in zip(got, want, strict=True):
        torch.testing.assert_close(a, w, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("name", list(CASES))
def test_fused_block_scores_equal_budget_minus_rank(name):
    """The budget kernel (attnpatch/estimators/proxy_budget_triton.py) on the statistics kernel's output equals
    `coverage_budget − rank_blocks` of the same statistics (a budget may move by one block at a rounding tie)."""
    b, hq, hkv, lq, lk, d, block, sample, bounds = CASES[name]
    g = torch.Generator(device=DEVICE).manual_seed(lq + d + 1)
    q = torch.randn(b, hq, lq, d, device=DEVICE, dtype=torch.bfloat16, generator=g)
    k = torch.randn(b, hkv, lk, d, device=DEVICE, dtype=torch.bfloat16, generator=g)
    assert proxy_triton.block_scores_unsupported_reason(q, k, bounds, block) is None
    rows = sampled_rows(lq, block, sample, DEVICE)
    allowed = allowed_blocks(b, lq, lk, block, block, bounds, DEVICE)
    gamma = torch.linspace(0.7, 0.98, hq, device=DEVICE)
    lo, hi = torch.full((hq,), 2.0, device=DEVICE), torch.full((hq,), 1e6, device=DEVICE)
    got = proxy_triton.proxy_block_scores_triton(q, k, bounds, d ** -0.5, block, rows, allowed, gamma, lo, hi)
    proxy, mass = proxy_triton.proxy_scores_triton(q, k, bounds, d ** -0.5, block, rows)
    rank = rank_blocks(proxy, allowed).repeat_interleave(hq // hkv, dim=1)
    want = coverage_budget(mass, gamma, lo, hi).unsqueeze(-1) - rank.float()
    m = allowed.expand_as(got)
    assert (got - want)[m].abs().max() <= 1
    assert (got[m] != want[m]).float().mean() < 1e-3
