"""Backend "auto" on CUDA: a prefill shorter than the method's measured break-even runs dense, with the
reason; at or above it the method runs on a fast backend (issue 10: no method slower than dense at 8K)."""

import pytest
import torch

import attnpatch
from attnpatch.testing import tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@torch.no_grad()
def test_auto_runs_short_prefills_dense_and_long_ones_sparse():
    model = tiny_model("llama", head_dim=64, num_attention_heads=4, hidden_size=256,
                       max_position_embeddings=40000).to("cuda", torch.bfloat16)
    for length, gated in ((8192, True), (32768, False)):
        ids = torch.randint(3, 256, (1, length), device="cuda")
        with attnpatch.patch_model(model, "xattention") as patch:
            model(ids)
            stats = patch.stats()
        reasons = [r for r in stats.dense_fallbacks if "backend 'auto'" in r]
        assert bool(reasons) == gated, (length, stats.dense_fallbacks, stats.backends)
        if not gated:
            assert any(k.startswith("prefill: ") and k != "prefill: sdpa" for k in stats.backends), stats.backends
