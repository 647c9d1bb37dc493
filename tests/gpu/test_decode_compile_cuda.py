"""On CUDA: a patched decode step on a static cache makes no host sync, and under
`torch.compile(mode="reduce-overhead")` (CUDA-graph replay) gives the eager logits with the Triton
decode kernel inside the graph. Skipped without a GPU."""

import inspect

import pytest
import torch

import attnpatch
from attnpatch.testing import tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _setup(decode: str, dtype=torch.bfloat16, **options):
    from transformers.cache_utils import StaticCache

    model = tiny_model("llama", hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                       max_position_embeddings=4096, intermediate_size=512).to("cuda", dtype)
    ck = "cache" if "cache" in inspect.signature(model.model.forward).parameters else "past_key_values"
    ids = torch.randint(3, 256, (2, 700), generator=torch.Generator().manual_seed(0)).cuda()
    patch = attnpatch.patch_model(model, decode=decode, **options)
    cache = StaticCache(config=model.config, max_cache_len=800)
    with torch.no_grad():
        tok = model(ids, **{ck: cache}).logits[:, -1:].argmax(-1)
    return model, patch, cache, {ck: cache}, tok


def _rewind(cache, n):
    for layer in cache.layers:
        layer.cumulative_length.fill_(n)


@torch.no_grad()
def _eager_and_reduce_overhead_steps(model, cache, kw, tok, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Six greedy steps' logits from `length` cached tokens, eager then compiled with reduce-overhead
    (warm-up, recording, replays)."""
    steps = []
    for mode in ("eager", "compiled"):
        _rewind(cache, length)
        fn = model if mode == "eager" else torch.compile(model, mode="reduce-overhead", fullgraph=True)
        t, out = tok, []
        for _ in range(6):
            torch.compiler.cudagraph_mark_step_begin()
            logits = fn(input_ids=t, **kw).logits[:, -1].float().clone()
            out.append(logits)
            t = logits.argmax(-1, keepdim=True)
        steps.append(torch.stack(out))
    return steps[0], steps[1]


@pytest.mark.parametrize("decode,options", [
    ("blasst", {"page_size": 64}), ("blasst", {"page_size": 64, "a": 16.0}),
    ("quest", {"budget": 128, "page_size": 16, "dense_layers": 0}),
    ("quest", {"budget": 128, "page_size": 16, "dense_layers": 0, "topk": "triton"})])
def test_static_decode_step_has_no_host_sync(decode, options):
    model, patch, cache, kw, tok = _setup(decode, **options)
    with torch.no_grad():
        model(input_ids=tok, **kw)  # first call: kernel compilation, backend checks memoised
        _rewind(cache, 700)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            model(input_ids=tok, **kw)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert patch.stats().backends.get("decode: triton") == 4
    patch.unpatch()


@pytest.mark.parametrize("decode,dtype,options", [
    ("blasst", torch.bfloat16, {"page_size": 64}),
    # float32: in bf16, inductor's fused projections round q differently from eager, which moves Quest's
    # near-tied page bounds and so its page choice (a different, equally valid selection)
    ("quest", torch.float32, {"budget": 128, "page_size": 16, "dense_layers": 0, "topk": "triton"}),
    ("quest", torch.float32, {"budget": 128, "page_size": 16, "dense_layers": 0}),
    # refreshes at steps 1 and 4 and recycled steps between, branch-free: the page-mass and top-k kernels
    # run every step and skip their work unless the device flag "refresh now" is set
    ("recycled", torch.float32, {"budget": 128, "page_size": 16, "stride": 3}),
    ("recycled", torch.float32, {"budget": 128, "page_size": 16, "stride": 3, "topk": "triton"})])
def test_reduce_overhead_decode_equals_eager(decode, dtype, options):
    model, patch, cache, kw, tok = _setup(decode, dtype, **options)
    eager, compiled = _eager_and_reduce_overhead_steps(model, cache, kw, tok, 700)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=5e-2)
    patch.unpatch()
    torch._dynamo.reset()


@pytest.mark.parametrize("batch", [1, 2])
def test_reduce_overhead_quest_takes_the_one_launch_kernel(monkeypatch, batch):
    """With the one-launch kernel on, a compiled reduce-overhead Quest step traces `attnpatch::bound_decode`
    (its barrier counters made by the cache layer, outside the CUDA-graph pool) and gives the eager logits."""
    from transformers.cache_utils import StaticCache

    import attnpatch.backends.triton.bound_decode_op as op

    monkeypatch.setenv("ATTNPATCH_BOUND_DECODE_CONFIG", "on")
    traced = []
    real = op.bound_decode
    monkeypatch.setattr(op, "bound_decode", lambda *a, **kw: traced.append(1) or real(*a, **kw))
    model = tiny_model("llama", hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                       max_position_embeddings=8192, intermediate_size=512).to("cuda", torch.float32)
    ck = "cache" if "cache" in inspect.signature(model.model.forward).parameters else "past_key_values"
    ids = torch.randint(3, 256, (batch, 3000), generator=torch.Generator().manual_seed(1)).cuda()
    patch = attnpatch.patch_model(model, decode="quest", budget=1024, page_size=64, dense_layers=0)
    cache = StaticCache(config=model.config, max_cache_len=4096)
    kw = {ck: cache}
    with torch.no_grad():
        tok = model(ids, **kw).logits[:, -1:].argmax(-1)
    eager, compiled = _eager_and_reduce_overhead_steps(model, cache, kw, tok, 3000)
    assert traced, "the compiled step did not take the one-launch kernel"
    torch.testing.assert_close(compiled, eager, rtol=0, atol=5e-2)
    patch.unpatch()
    torch._dynamo.reset()
