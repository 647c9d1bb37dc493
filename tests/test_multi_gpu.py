"""Two GPUs: kernels launch on their inputs' GPU, and a patched model spread with accelerate's
device map gives the logits of the same model on one GPU. Skipped on machines with fewer GPUs (CI)."""

import pytest
import torch

from attnpatch.api import patch_model
from attnpatch.backends.reference import block_sparse_attention
from attnpatch.sparsity import BlockSelection
from attnpatch.testing import tiny_model

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")


def test_block_sparse_kernel_runs_on_the_inputs_gpu():
    from attnpatch.backends.triton.block_sparse import block_sparse_attention_triton

    torch.cuda.set_device(0)
    g = torch.Generator(device="cuda:1").manual_seed(0)
    q, k, v = (torch.randn(1, h, 1000, 64, device="cuda:1", dtype=torch.bfloat16, generator=g) for h in (4, 2, 2))
    sel = BlockSelection.causal(1, 4, 1000, 1000, 128, 128, device="cuda:1")
    out = block_sparse_attention_triton(q, k, v, sel)
    assert out.device == q.device
    ref = block_sparse_attention(q.float(), k.float(), v.float(), sel)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=0)


def test_patched_model_over_two_gpus_matches_one_gpu():
    from accelerate import dispatch_model

    model = tiny_model("llama", num_hidden_layers=4, head_dim=64, hidden_size=256, num_attention_heads=4,
                       num_key_value_heads=2).to(torch.bfloat16)
    ids = torch.randint(0, 256, (1, 900), generator=torch.Generator().manual_seed(0))
    with patch_model(model.to("cuda:0"), method="blasst"):
        one = model(ids.to("cuda:0")).logits.float().cpu()
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 0,
                  "model.layers.2": 1, "model.layers.3": 1, "model.norm": 1, "lm_head": 1}
    spread = dispatch_model(model, device_map=device_map)
    torch.cuda.set_device(0)
    with patch_model(spread, method="blasst") as patch:
        two = spread(ids.to("cuda:0")).logits.float().cpu()
        assert set(patch.stats().backends) == {"prefill: triton"}  # Triton on both GPUs, no fallback
    torch.testing.assert_close(two, one, atol=2e-2, rtol=0)
