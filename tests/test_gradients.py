"""Training through a patch: gradients of a sparse method are those of attention restricted to its
selection (checked against SDPA with the same mask), and equal dense attention's at full density."""

import pytest
import torch
from conftest import random_ids

import attnpatch
from attnpatch.backends.reference import block_sparse_attention
from attnpatch.sparsity import BlockSelection


def _grads(model, ids):
    model.zero_grad()
    logits = model(ids).logits
    logits.float().pow(2).mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method,options", [("a_shape", {"block_size": 16, "local_blocks": 2}),
                                            ("blasst", {"block_size": 16, "a": 1e-30})])
def test_gradients_flow_through_the_reference_backend(llama, method, options):
    ids = random_ids(1, 96)
    llama.train()
    try:
        dense_logits, dense = _grads(llama, ids)
        with attnpatch.patch_model(llama, method=method, **options) as patch:
            logits, got = _grads(llama, ids)
            assert patch.stats().backends == {"prefill: reference": 2}
    finally:
        llama.eval()
    assert set(got) == set(dense)
    if method == "blasst":  # λ ≈ 0: full density, so the gradients are dense attention's
        for name in dense:
            torch.testing.assert_close(got[name], dense[name], atol=1e-5, rtol=1e-4)
    else:
        assert not torch.allclose(logits, dense_logits, atol=1e-4)
        assert all(torch.isfinite(g).all() for g in got.values())


def test_sparse_gradients_equal_masked_sdpa_gradients():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 70, 16, generator=g, requires_grad=True) for _ in range(3))
    k2, v2 = (torch.randn(2, 2, 70, 16, generator=g, requires_grad=True) for _ in range(2))
    keep = torch.rand(2, 4, 5, 5, generator=g) < 0.5
    keep |= torch.eye(5, dtype=torch.bool)  # the diagonal: every row sees at least itself
    sel = BlockSelection.from_block_mask(keep, 16, 16, 70, 70)
    out = block_sparse_attention(q, k2, v2, sel, scale=0.3)
    token = sel.to_block_mask().repeat_interleave(16, -1).repeat_interleave(16, -2)[..., :70, :70]
    token &= torch.ones(70, 70, dtype=torch.bool).tril()
    ref = torch.nn.functional.scaled_dot_product_attention(q, k2, v2, attn_mask=token, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(out.sum(), (q, k2, v2))
    ref_grads = torch.autograd.grad(ref.sum(), (q, k2, v2))
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
