"""GPU: ProxyAttn's fused block-statistics kernel (attnpatch/estimators/proxy_triton.py, compiled) against
the torch path of `proxy_scores` (skipped without CUDA). Its speed: `attnpatch.bench.methods`."""

from __future__ import annotations

import pytest
import torch

from attnpatch.estimators import proxy_triton
from attnpatch.estimators.proxy import proxy_scores_torch, sampled_rows
from attnpatch.sparsity import KeyBounds

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
