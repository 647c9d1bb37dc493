"""GPU: the one-launch page-bound decode kernel (cooperative launch, head barrier) selects Quest's pages and
attends over them like the separate kernels, call after call and inside a CUDA graph (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from attnpatch.backends.triton.bound_decode import bound_decode_attention
from attnpatch.backends.triton.decode import sparse_decode_attention
from attnpatch.backends.triton.topk_select import group_topk_ascending_triton
from attnpatch.cache import key_page_bounds
from attnpatch.estimators.page_bounds_triton import page_upper_bounds_triton
from attnpatch.sparsity import PageSelection

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize(("b", "length", "ps"), [(1, 32768, 128), (1, 16384, 64), (4, 16384, 64), (2, 8192, 16)])
@pytest.mark.parametrize("validity", ["key_start", "key_valid"])
@torch.no_grad()
def test_one_launch_matches_the_separate_kernels_on_cuda(b, length, ps, validity):
    hq, hkv, d = 32, 8, 128
    g = torch.Generator(device="cuda").manual_seed(length + b)
    q = torch.randn(b, hq, 1, d, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(b, hkv, length, d, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(b, hkv, length, d, device="cuda", dtype=torch.bfloat16, generator=g)
    lo, hi = key_page_bounds(k, ps)
    n, kp, scale = length // ps, length // 16 // ps, d ** -0.5
    first = torch.zeros(b, dtype=torch.long, device="cuda")
    first[-1] = 2
    end = torch.full((b,), n, dtype=torch.long, device="cuda")
    end[-1] = n - 3
    attend = {"key_start": first * ps}
    if validity == "key_valid":
        attend = {"key_valid": torch.rand(b, length, device="cuda", generator=g) > 0.1}
    out, (idx, counts) = bound_decode_attention(q, k, v, lo, hi, n, kp, first, end, page_size=ps, scale=scale,
                                                return_selection=True, **attend)
    ref_idx, ref_counts = group_topk_ascending_triton(page_upper_bounds_triton(q, lo, hi, n, scale), kp, first, end)
    assert torch.equal(counts, ref_counts)
    assert (idx == ref_idx).all(-1).float().mean() >= 0.95  # bf16 bounds: a near tie may go either way
    same = sparse_decode_attention(q, k, v, PageSelection(idx, counts, ps, length), scale=scale, **attend)
    torch.testing.assert_close(out, same, rtol=0, atol=2e-2)  # the attention over the lists it chose
    again = [bound_decode_attention(q, k, v, lo, hi, n, kp, first, end, page_size=ps, scale=scale, **attend)
             for _ in range(20)]
    assert all(torch.equal(x, again[0]) for x in again)  # counters reset: every call the same
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = bound_decode_attention(q, k, v, lo, hi, n, kp, first, end, page_size=ps, scale=scale, **attend)
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, again[0])
