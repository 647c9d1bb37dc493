"""A patch's life: nested patches hand the model back, deep copies are patched on their own, unpatching
restores exactly, observers see every call."""

import copy

import pytest
import torch
from conftest import random_ids

import attnpatch


@torch.no_grad()
def test_nested_patches_restore_the_outer_one_on_exit(llama):
    ids = random_ids(1, 128)
    ref = llama(ids).logits
    with attnpatch.patch_model(llama, method="a_shape", block_size=16, local_blocks=2) as outer:
        sparse = llama(ids).logits
        with attnpatch.patch_model(llama, method="blasst", block_size=16, a=1e4) as inner:
            llama(ids)
            assert inner.active and not outer.active
            assert inner.stats().layers[0]["prefill_method"] == "blasst"
        assert outer.active and not inner.active
        torch.testing.assert_close(llama(ids).logits, sparse, atol=0, rtol=0)  # the outer patch runs again
        assert outer.stats().layers[0]["prefill_calls"] == 2
    assert llama.config._attn_implementation == "sdpa" and torch.equal(llama(ids).logits, ref)


@torch.no_grad()
def test_unpatching_a_suspended_patch_leaves_the_active_one(llama):
    first = attnpatch.patch_model(llama, method="a_shape", block_size=16, local_blocks=2)
    second = attnpatch.patch_model(llama, method="blasst", block_size=16)
    first.unpatch()
    assert second.active and "removed" in repr(first)
    second.unpatch()
    assert llama.config._attn_implementation == "sdpa" and not hasattr(llama, "_attnpatch_stack")


@torch.no_grad()
def test_a_deep_copy_is_patched_on_its_own(llama):
    ids = random_ids(1, 128)
    patch = attnpatch.patch_model(llama, method="a_shape", block_size=16, local_blocks=2)
    twin = copy.deepcopy(llama)
    out = llama(ids).logits
    torch.testing.assert_close(twin(ids).logits, out, atol=0, rtol=0)
    assert patch.stats().layers[0]["prefill_calls"] == 1  # the copy counts in its own stats
    twin_patch = twin._attnpatch_stack[-1]
    assert twin_patch is not patch and twin_patch.stats().layers[0]["prefill_calls"] == 1
    twin_patch.unpatch()  # unpatching the copy leaves the original patched
    assert twin.config._attn_implementation == "sdpa"
    torch.testing.assert_close(llama(ids).logits, out, atol=0, rtol=0)
    assert patch.active and patch.stats().layers[0]["prefill_calls"] == 2
    patch.unpatch()


@torch.no_grad()
def test_observers_see_dense_and_sparse_calls(llama):
    calls = []
    with attnpatch.patch_model(llama, method="a_shape", block_size=16, local_blocks=2, decode="dense") as patch:
        handle = patch.observe(calls.append)
        llama.generate(random_ids(1, 128), max_new_tokens=3, do_sample=False)
        llama(random_ids(1, 20))  # fits in sink + local: a dense prefill call
        handle.remove()
        llama(random_ids(1, 20))
    phases = [(c.layer, c.phase, c.is_dense, c.backend) for c in calls]
    assert phases[:2] == [(0, "prefill", False, "reference"), (1, "prefill", False, "reference")]
    assert sum(p[1] == "decode" for p in phases) == 2 * 2 and all(p[3] == "sdpa" for p in phases[2:])
    assert len(calls) == 2 + 4 + 2  # the call after remove() is not seen
    c = calls[0]
    assert c.output.shape == c.query.shape and c.key.shape[1] == 2 and c.selection is not None
    with pytest.raises(ValueError, match="must be callable"):
        patch.observe(3)
