"""GPU: Quest's static-cache metadata update and page selection captured in a CUDA graph equal eager
execution (no host sync inside); quest / recycled on a bf16 SmolLM2-shaped tiny model through the
Triton decode kernel agree with the reference backend (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch
from conftest import cache_arg
from transformers import DynamicCache

import attnpatch
from attnpatch.cache import StaticPageBoundsLayer, key_page_bounds
from attnpatch.methods.base import DecodeContext
from attnpatch.methods.decode.quest import Quest
from attnpatch.sparsity import KeyBounds
from attnpatch.testing import tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEVICE = torch.device("cuda")


@torch.no_grad()
def test_quest_update_and_select_replay_in_a_cuda_graph():
    b, hkv, hq, d, cap, ps = 2, 3, 9, 64, 1024, 16
    layer = StaticPageBoundsLayer(cap, ps)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    prefill = torch.randn(b, hkv, 500, d, device=DEVICE, dtype=torch.bfloat16, generator=g)
    layer.update(prefill, prefill.clone())
    method = Quest(budget=128, page_size=ps, dense_layers=0)
    k_in = torch.zeros(b, hkv, 1, d, device=DEVICE, dtype=torch.bfloat16)
    q_in = torch.zeros(b, hq, 1, d, device=DEVICE, dtype=torch.bfloat16)
    ctx = DecodeContext(0, d ** -0.5, KeyBounds(), None, layer)

    def step():
        keys, _ = layer.update(k_in, k_in)
        sel = method.select(q_in, keys, ctx)
        return sel.indices, sel.counts

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up: one real step (writes position 500)
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # recorded, not run
        indices, counts = step()
    for t in range(40):
        k_in.copy_(torch.randn(b, hkv, 1, d, device=DEVICE, generator=g))
        q_in.copy_(torch.randn(b, hq, 1, d, device=DEVICE, generator=g))
        graph.replay()
        written = int(layer.cumulative_length)
        assert written == 502 + t
        lo, hi = key_page_bounds(layer.keys, ps, written)
        assert (torch.equal(layer.page_min[:, :, :lo.shape[2]], lo)
                and torch.equal(layer.page_max[:, :, :hi.shape[2]], hi))
        eager = method.select(q_in, layer.keys, ctx)
        assert torch.equal(indices, eager.indices) and torch.equal(counts, eager.counts)
        assert counts.eq(8).all() and (indices <= (written - 1) // ps).all()


@torch.no_grad()
@pytest.mark.parametrize("decode", ["quest:budget=64,page_size=16,dense_layers=0",
                                    "recycled:budget=64,page_size=16,stride=4"])
def test_triton_decode_agrees_with_reference(decode):
    model = tiny_model("llama", num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                       hidden_size=256).to(DEVICE, torch.bfloat16)
    ids = torch.randint(3, 256, (1, 312), device=DEVICE)
    logits = {}
    for backend in ("reference", "triton"):  # the same tokens through both (teacher forcing)
        with attnpatch.patch_model(model, decode=decode, backend=backend) as patch:
            cache = DynamicCache(config=model.config)
            model(ids[:, :300], **cache_arg(model, cache), use_cache=True)
            steps = [model(ids[:, t:t + 1], **cache_arg(model, cache), use_cache=True).logits[:, -1]
                     for t in range(300, 312)]
            ran = patch.stats().backends
        assert f"decode: {backend}" in ran, ran
        logits[backend] = torch.stack(steps).float()
    ref, tri = logits["reference"], logits["triton"]
    assert (tri - ref).norm() / ref.norm() < 2e-2


@pytest.mark.parametrize(("hq", "hkv", "d"), [(32, 8, 128), (9, 3, 64), (4, 1, 256)])
def test_page_bound_kernel_equals_the_float32_torch_path(hq, hkv, d):
    from attnpatch.estimators.page_bounds import page_upper_bounds, page_upper_bounds_torch

    g = torch.Generator(device=DEVICE).manual_seed(d)
    q = torch.randn(2, hq, 1, d, device=DEVICE, dtype=torch.bfloat16, generator=g)
    k = torch.randn(2, hkv, 4000, d, device=DEVICE, dtype=torch.bfloat16, generator=g)
    lo, hi = key_page_bounds(k, 16)
    out = page_upper_bounds(q, lo, hi, 200, 0.125, use_kernel=True)
    ref = page_upper_bounds_torch(q, lo[:, :, :200], hi[:, :, :200]) * 0.125
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("rows", "n", "k"), [(32, 8192, 512), (8, 2048, 128), (64, 4096, 256)])
def test_topk_kernel_selects_the_torch_topk_set(rows, n, k):
    from attnpatch.backends.triton.topk_select import topk_ascending_triton

    g = torch.Generator(device=DEVICE).manual_seed(n)
    scores = torch.randn(rows, n, device=DEVICE, generator=g)
    scores[:, n // 2:n // 2 + 10] = float("-inf")
    idx, counts = topk_ascending_triton(scores, k)
    ref = scores.topk(k, dim=-1).indices.sort(-1).values.int()
    assert counts.eq(k).all() and torch.equal(idx, ref)


@pytest.mark.parametrize("search", [0, 1, 2])
@pytest.mark.parametrize("combine", ["softmax_sum", "max"])
def test_group_topk_kernel_matches_the_torch_path(combine, search, monkeypatch):
    """The fused combine + masks + top-k (Quest's default path) picks Quest's torch-path pages."""
    from attnpatch.backends.triton.topk_select import group_topk_ascending_triton

    monkeypatch.setenv("ATTNPATCH_TOPK_CONFIG", f"{search},4")
    g = torch.Generator(device=DEVICE).manual_seed(5)
    b, h, grp, n, k = 4, 8, 4, 2048, 128
    scores = torch.randn(b, h, grp, n, device=DEVICE, generator=g) * 3
    first = torch.tensor([0, 3, 0, 40], device=DEVICE)
    end = torch.tensor(2000, device=DEVICE)
    idx, counts = group_topk_ascending_triton(scores, k, first, end, combine, 1)
    pages = torch.arange(n, device=DEVICE)
    valid = (pages >= first.view(b, 1)) & (pages < end)
    forced = valid & ((pages == first.view(b, 1)) | (pages >= end - 2))
    masked = scores.masked_fill(~valid.view(b, 1, 1, n), float("-inf"))
    score = masked.amax(2) if combine == "max" else torch.softmax(masked, -1).sum(2)
    score = torch.where(forced.view(b, 1, n), torch.finfo(torch.float32).max,
                        score.masked_fill(~valid.view(b, 1, n), float("-inf")))
    ref = score.topk(k, dim=-1).indices.sort(-1).values.int()
    assert counts.eq(k).all() and torch.equal(idx, ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("hq", "hkv", "d", "page"), [(32, 8, 128, 16), (9, 3, 64, 64), (4, 1, 256, 128)])
def test_page_lse_kernel_equals_the_torch_reference(hq, hkv, d, page, dtype):
    """Recycled's ranking kernel, compiled, with left padding and a static cache's unwritten slots (a set
    flag changes nothing; a clear one is tested under the interpreter)."""
    from attnpatch.estimators.page_lse import page_lse_torch
    from attnpatch.estimators.page_lse_triton import page_lse_triton

    g = torch.Generator(device=DEVICE).manual_seed(hq + d)
    q = torch.randn(2, hq, 1, d, device=DEVICE, dtype=dtype, generator=g)
    k = torch.randn(2, hkv, 5000, d, device=DEVICE, dtype=dtype, generator=g)
    start = torch.tensor([0, 333], device=DEVICE)
    valid = torch.arange(5000, device=DEVICE).view(1, -1) < torch.tensor([[4000], [4500]], device=DEVICE)
    out = page_lse_triton(q, k, page, d ** -0.5, key_start=start, key_valid=valid)
    visible = valid & (torch.arange(5000, device=DEVICE) >= start.view(2, 1))
    torch.testing.assert_close(out, page_lse_torch(q, k, page, d ** -0.5, visible), rtol=1e-3, atol=1e-3)
    flagged = page_lse_triton(q, k, page, d ** -0.5, key_start=start, key_valid=valid,
                              flag=torch.ones(1, dtype=torch.int32, device=DEVICE))
    assert torch.equal(flagged, out)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("hq", "hkv", "d", "page"), [(32, 8, 128, 16), (9, 3, 64, 64), (4, 1, 256, 128)])
def test_decode_kernel_page_lse_equals_the_separate_kernel(hq, hkv, d, page, dtype):
    """The decode kernel's per-page log-sum-exp over every page (a Recycled refresh in a compiled step) is
    the separate ranking kernel's, and its output the plain decode's."""
    from attnpatch.backends.triton.decode import sparse_decode_attention
    from attnpatch.backends.triton.decode_op import sparse_decode_with_page_lse
    from attnpatch.estimators.page_lse_triton import page_lse_triton
    from attnpatch.sparsity import PageSelection

    g = torch.Generator(device=DEVICE).manual_seed(hq + d + 1)
    q = torch.randn(2, hq, 1, d, device=DEVICE, dtype=dtype, generator=g)
    k, v = (torch.randn(2, hkv, 5000, d, device=DEVICE, dtype=dtype, generator=g) for _ in range(2))
    start = torch.tensor([0, 333], device=DEVICE)
    valid = torch.arange(5000, device=DEVICE).view(1, -1) < torch.tensor([[4000], [4500]], device=DEVICE)
    sel = PageSelection.all_pages(2, hkv, 5000, page, DEVICE)
    out, buf = sparse_decode_with_page_lse(q, k, v, sel, scale=d ** -0.5, key_start=start, key_valid=valid)
    assert torch.equal(out, sparse_decode_attention(q, k, v, sel, key_start=start, key_valid=valid))
    ref = page_lse_triton(q, k, page, d ** -0.5, key_start=start, key_valid=valid).reshape(buf.shape)
    assert torch.equal(torch.isinf(buf), torch.isinf(ref))
    fin = torch.isfinite(ref)
    torch.testing.assert_close(buf[fin], ref[fin], rtol=1e-3, atol=1e-3)
