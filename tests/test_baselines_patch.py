"""The three baselines (xattention, vertical_slash, flexprefill) through `patch_model` on a tiny Qwen2
(GQA, projection biases): left padding, chunked prefill through the KV cache, no cache (transposed
keys), per-layer options; the selection ran sparse on every full-attention call."""

import pytest
import torch
from conftest import cache_arg, left_padded
from transformers import DynamicCache

import attnpatch
from attnpatch.testing import tiny_model

OPTIONS = {
    "xattention": dict(block_size=16, stride=4, threshold=(0.6, 0.8, 0.9, 0.95)),
    "vertical_slash": dict(block_size=16, vertical_size=24, slash_size=(16, 32, 48, 64), local_diagonals=16),
    "flexprefill": dict(block_size=16, min_budget=32, gamma=0.9, tau=((0.0, 0.1, 0.2, 1.0), (0.1, 0.1, 0.1, 0.1))),
}


@torch.no_grad()
@pytest.mark.parametrize("name", list(OPTIONS))
def test_padding_chunked_prefill_and_no_cache(name):
    model = tiny_model("qwen2")
    ids, mask = left_padded(2, 260, [0, 41], seed=7)
    valid = mask.bool()
    dense = model(ids, attention_mask=mask).logits
    with attnpatch.patch_model(model, method=name, **OPTIONS[name]) as patch:
        whole = model(ids, attention_mask=mask, use_cache=False).logits
        cache = DynamicCache(config=model.config)  # passed in, not read back from the output (5.40 drops that)
        model(ids[:, :150], attention_mask=mask[:, :150], **cache_arg(model, cache))
        rest = model(ids[:, 150:], attention_mask=mask, **cache_arg(model, cache)).logits
        stats = patch.stats()
    assert not stats.dense_fallbacks and stats.backends == {"prefill: reference": 6}
    assert 0 < stats.density < 1
    for out, ref, v in ((whole, dense, valid), (rest, dense[:, 150:], valid[:, 150:])):
        assert torch.isfinite(out[v]).all() and (out[v] - ref[v]).abs().max() < 1.0
