"""GPU: XAttention's fused antidiagonal kernel (attnpatch/estimators/antidiagonal_triton.py, compiled)
against the torch path of `antidiagonal_block_scores` on bf16 inputs (skipped without CUDA). Its speed:
bench/scripts/tune_antidiagonal.py."""

from __future__ import annotations

import pytest
import torch

from attnpatch.estimators import antidiagonal_triton
from attnpatch.estimators.antidiagonal import antidiagonal_block_scores_torch
from attnpatch.sparsity import KeyBounds

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEVICE = torch.device("cuda")

# name: (B, Hq, Hkv, Lq, Lk, D, block, stride, bounds)
CASES = {
    "8k-gqa-s8-b128": (1, 32, 8, 8192, 8192, 128, 128, 8, KeyBounds()),
    "s4-b64-ragged": (1, 8, 2, 3000, 3000, 128, 64, 4, KeyBounds()),
    "s16-b128-d256": (1, 8, 2, 2048, 2048, 256, 128, 16, KeyBounds()),
    "s16-b16-d64": (1, 8, 8, 1500, 1500, 64, 16, 16, KeyBounds()),
    "chunked-left-padding": (2, 8, 2, 1000, 4096, 128, 64, 8, KeyBounds(key_start=torch.tensor([0, 700]))),
    "window": (1, 8, 2, 4096, 4096, 128, 128, 8, KeyBounds(window=1000)),
    "d16-b32": (1, 4, 2, 999, 999, 16, 32, 8, KeyBounds()),
}


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_equals_the_torch_path(name):
    b, hq, hkv, lq, lk, d, block, stride, bounds = CASES[name]
    g = torch.Generator(device=DEVICE).manual_seed(lq + d)
    q = torch.randn(b, hq, lq, d, device=DEVICE, dtype=torch.bfloat16, generator=g)
    k = torch.randn(b, hkv, lk, d, device=DEVICE, dtype=torch.bfloat16, generator=g)
    assert antidiagonal_triton.unsupported_reason(q, k, block, stride) is None
    scale = d ** -0.5
    out = antidiagonal_triton.antidiagonal_block_scores_triton(q, k, scale, bounds, block, stride)
    # The torch path's bf16 GEMM rounds the scores to 8 bits (the kernel keeps float32): compare with the
    # torch path on float32 inputs, the kernel's own rounding being only its bf16 products.
    ref = antidiagonal_block_scores_torch(q.float(), k.float(), scale, bounds, block, stride)
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)
    bf16 = antidiagonal_block_scores_torch(q, k, scale, bounds, block, stride)
    assert (out - bf16).abs().max() < 0.1


def test_fp32_and_fp16_inputs():
    g = torch.Generator(device=DEVICE).manual_seed(1)
    for dtype in (torch.float32, torch.float16):
        q = torch.randn(1, 8, 1234, 128, device=DEVICE, dtype=dtype, generator=g)
        k = torch.randn(1, 2, 1234, 128, device=DEVICE, dtype=dtype, generator=g)
        out = antidiagonal_triton.antidiagonal_block_scores_triton(q, k, 0.09, KeyBounds(), 64, 8)
        ref = antidiagonal_block_scores_torch(q.float(), k.float(), 0.09, KeyBounds(), 64, 8)
        torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)
