"""`dense` must be bit-identical to the unpatched model: prefill, padded batch, greedy generate."""

import torch
from conftest import cache_arg, left_padded, random_ids

import attnpatch


@torch.no_grad()
def test_prefill_logits_identical(tiny):
    ids = random_ids(1, 40)
    ref = tiny(ids).logits
    with attnpatch.patch_model(tiny, method="dense"):
        out = tiny(ids).logits
    assert torch.equal(ref, out)


@torch.no_grad()
def test_padded_batch_logits_identical(tiny):
    ids, mask = left_padded(3, 40, [0, 7, 19], seed=1)
    ref = tiny(ids, attention_mask=mask).logits
    with attnpatch.patch_model(tiny, method="dense"):
        out = tiny(ids, attention_mask=mask).logits
    assert torch.equal(ref, out)


@torch.no_grad()
def test_greedy_generate_identical(tiny):
    ids, mask = left_padded(2, 24, [0, 5], seed=2)
    kw = dict(attention_mask=mask, max_new_tokens=16, do_sample=False, output_logits=True,
              return_dict_in_generate=True, pad_token_id=0)
    ref = tiny.generate(ids, **kw)
    with attnpatch.patch_model(tiny, method="dense", decode="dense"):
        out = tiny.generate(ids, **kw)
    assert torch.equal(ref.sequences, out.sequences)
    assert all(torch.equal(a, b) for a, b in zip(ref.logits, out.logits, strict=True))
    assert ref.sequences.shape[1] == 24 + 16


@torch.no_grad()
def test_chunked_prefill_identical(llama):
    """Prefill in two chunks through the cache (1 < Lq < Lk) matches the unpatched model."""
    from transformers import DynamicCache

    ids = random_ids(1, 50, seed=3)

    def run():
        cache = DynamicCache(config=llama.config)
        llama(ids[:, :30], **cache_arg(llama, cache), use_cache=True)
        return llama(ids[:, 30:], **cache_arg(llama, cache), use_cache=True).logits

    ref = run()
    with attnpatch.patch_model(llama):
        out = run()
    assert torch.equal(ref, out)
