"""GPU: `sale`'s fused Triton estimate (attnpatch/estimators/lowbit_triton.py, compiled) against the torch
path of `relative_block_scores` on bf16 inputs, and the `sale` selection of both paths (skipped without
CUDA). Cases: GQA, head dims 16 (fp16 dot) to 256, block sizes 16 to 128, chunked prefill, left padding,
sliding window, 8 and 4 bits."""

from __future__ import annotations

import functools

import pytest
import torch

from attnpatch.estimators.lowbit import relative_block_scores
from attnpatch.methods.base import PrefillContext
from attnpatch.methods.prefill import sale as sale_module
from attnpatch.sparsity import KeyBounds
from attnpatch.sparsity.regions import forced_blocks

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEVICE = torch.device("cuda")

# name: (B, Hq, Hkv, Lq, Lk, D, block, key_start or None, window or None)
CASES = {
    "gqa-d128-b64": (1, 8, 2, 4096, 4096, 128, 64, None, None),
    "mha-d64-b128": (1, 4, 4, 3000, 3000, 64, 128, None, None),
    "chunked": (2, 8, 2, 1000, 4096, 128, 64, None, None),
    "left-padding": (2, 8, 2, 4096, 4096, 128, 64, (0, 700), None),
    "window": (1, 8, 2, 4096, 4096, 128, 64, None, 1000),
    "d256": (1, 4, 2, 2048, 2048, 256, 64, None, None),
    "d32-b32": (1, 4, 2, 777, 777, 32, 32, (100,), None),
    "d16-b16": (1, 4, 2, 500, 700, 16, 16, None, None),  # head dim below 32: the fp16 dot
}


def _case(name: str, seed: int = 0):
    b, hq, hkv, lq, lk, d, block, start, window = CASES[name]
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    q = torch.randn(b, hq, lq, d, device=DEVICE, generator=g).bfloat16()
    k = torch.randn(b, hkv, lk, d, device=DEVICE, generator=g).bfloat16()
    k[:, :, lk // 3] += 3 * q[:, ::hq // hkv].mean(2)  # a heavy key far from sink and local
    key_start = None if start is None else torch.tensor(start, device=DEVICE)
    return q, k, KeyBounds(key_start=key_start, window=window), block


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_equals_the_torch_path(name, bits):
    q, k, bounds, block = _case(name)
    b, lq, lk = q.shape[0], q.shape[2], k.shape[2]
    forced = forced_blocks(b, lq, lk, block, block, bounds, 1, 2, DEVICE)
    got = relative_block_scores(q, k, bounds, 0.088, block, forced, bits, use_kernel=True)
    want = relative_block_scores(q, k, bounds, 0.088, block, forced, bits, use_kernel=False)
    assert torch.equal(got.isinf(), want.isinf()) and not got.isnan().any()
    # fp32 exp may flush tiny scores to 0 on one side only: below 1e-30 nothing is compared
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-30)


@pytest.mark.parametrize("name", ["gqa-d128-b64", "left-padding", "window"])
def test_sale_selection_is_the_same_on_both_paths(name, monkeypatch):
    q, k, bounds, block = _case(name, seed=1)
    method = sale_module.Sale(block_size=block, min_length=0, tau=(0.0, 0.05, 0.1, 0.3) * 2)
    ctx = PrefillContext(0, 0.088, bounds, bounds.window)
    fused = method.select(q, k, ctx).to_block_mask()
    monkeypatch.setattr(sale_module, "relative_block_scores",
                        functools.partial(relative_block_scores, use_kernel=False))
    reference = method.select(q, k, ctx).to_block_mask()
    differ = int((fused != reference).sum())
    assert differ <= max(2, reference.sum().item() // 100_000), f"{differ} blocks differ (borderline scores)"
    assert 0 < reference[:, 1:].float().mean() < reference[:, 0].float().mean()  # τ > 0 prunes, τ = 0 keeps
