"""Masks in closed form: what `attnpatch_mask` hands the attention function for transformers' real mask
requests, and what `key_bounds` reads off whatever mask arrives."""

import pytest
import torch
from conftest import left_padded, random_ids

import attnpatch
from attnpatch.masking import AttnMask, attnpatch_mask, key_bounds
from attnpatch.sparsity import KeyBounds
from attnpatch.testing import tiny_model


def _seen_masks(model, ids, mask):
    """The attention_mask every layer receives under an active patch (an observer of dense calls)."""
    seen = []
    with attnpatch.patch_model(model) as patch:
        patch.observe(lambda call: seen.append((call.layer, call.bounds)))
        with torch.no_grad():
            model(ids, attention_mask=mask)
    return dict(seen)


def _dense_mask(valid, lq, window=None):
    lk = valid.shape[1]
    q = torch.arange(lq)[:, None] + (lk - lq)
    kv = torch.arange(lk)[None, :]
    m = kv <= q
    if window is not None:
        m = m & (kv > q - window)
    return (m[None] & valid[:, None, :])[:, None]


def test_padded_causal_request_becomes_first_real_keys():
    model = tiny_model("llama")
    ids, mask = left_padded(2, 40, [0, 7])
    bounds = _seen_masks(model, ids, mask)
    assert bounds[0].key_start.tolist() == [0, 7] and bounds[0].window is None and bounds[0].mask is None


def test_sliding_window_request_keeps_the_window_and_the_padding():
    model = tiny_model("mistral", sliding_window=8)
    ids, mask = left_padded(2, 40, [0, 7])
    bounds = _seen_masks(model, ids, mask)
    assert bounds[0].window == 8 and bounds[0].key_start.tolist() == [0, 7] and bounds[0].mask is None
    q = tiny_model("qwen2", sliding_window=8)  # layer 0 full, layer 1 sliding
    bounds = _seen_masks(q, ids, mask)
    assert bounds[0].window is None and bounds[1].window == 8


def test_unpadded_inputs_are_plain_causal():
    bounds = _seen_masks(tiny_model("llama"), random_ids(1, 30), None)
    assert bounds[0].is_plain


def test_attn_mask_builds_the_same_dense_tensor_as_sdpa_mask():
    from transformers.masking_utils import sdpa_mask, sliding_window_causal_mask_function

    valid = torch.arange(20)[None, :] >= torch.tensor([[0], [5]])
    kw = dict(batch_size=2, q_length=20, kv_length=20, q_offset=0, kv_offset=0, attention_mask=valid,
              local_size=6, mask_function=sliding_window_causal_mask_function(6), allow_is_causal_skip=True)
    got = attnpatch_mask(**kw)
    assert isinstance(got, AttnMask) and got.window == 6
    assert torch.equal(got.dense(), sdpa_mask(**kw))
    other = dict(kw, mask_function=lambda b, h, q, k: k <= q)  # a mask function it does not know
    assert isinstance(attnpatch_mask(**other), torch.Tensor)


def test_tensor_masks_are_read_in_closed_form_when_they_are():
    left = torch.arange(20)[None, :] >= torch.tensor([[0], [7]])
    b = key_bounds(_dense_mask(left, 20), 20, 20, None)
    assert b.key_start.tolist() == [0, 7] and b.mask is None
    right = torch.arange(20)[None, :] < torch.tensor([[20], [15]])
    b = key_bounds(_dense_mask(right, 20), 20, 20, None)
    assert b.key_start is None and torch.equal(b.key_valid, right)
    window = _dense_mask(torch.ones(1, 20, dtype=torch.bool), 20, window=4)
    b = key_bounds(window, 20, 20, None)
    assert b.mask is not None  # not causal + padding: only executors that read tensors take it
    b = key_bounds(window, 20, 20, 4)
    assert b.mask is not None and b.window == 4


def test_a_mask_is_analysed_once_per_object():
    mask = _dense_mask(torch.arange(20)[None, :] >= torch.tensor([[0], [7]]), 20)
    first = key_bounds(mask, 20, 20, None)
    assert key_bounds(mask, 20, 20, None) is first
    assert key_bounds(mask.clone(), 20, 20, None) is not first


def test_a_decode_mask_gives_every_layer_the_same_bounds():
    """A decode step's AttnMask is read once: every layer gets the same KeyBounds, with each row's first
    and one-past-last valid key precomputed (Quest's sink page, the static cache's written length)."""
    valid = torch.ones(2, 30, dtype=torch.bool)
    valid[1, :6] = False
    valid[:, 25:] = False  # static cache slots not written yet
    mask = AttnMask(1, 30, valid, None, {})
    first = key_bounds(mask, 1, 30, None)
    assert key_bounds(mask, 1, 30, None) is first
    assert first.first_key(2, "cpu").tolist() == [0, 6] and first.key_end.tolist() == [25, 25]
    assert KeyBounds(key_valid=valid).first_key(2, "cpu").tolist() == [0, 6]


@pytest.mark.parametrize("window", [None, 5])
def test_bounds_describe_the_dense_mask(window):
    valid = torch.arange(30)[None, :] >= torch.tensor([[0], [9]])
    start = torch.tensor([0, 9])
    bounds = KeyBounds(key_start=start, window=window)
    assert torch.equal(bounds.dense_mask(2, 12, 30), _dense_mask(valid, 12, window))
    assert torch.equal(KeyBounds(key_valid=valid, window=window).dense_mask(2, 12, 30), _dense_mask(valid, 12, window))
    assert bounds.first_key(2, "cpu").tolist() == [0, 9]
    assert KeyBounds(window=window).first_key(2, "cpu").tolist() == [0, 0]  # a window is not padding


@pytest.mark.parametrize("kind", ["window", "padding", "tensor"])
def test_rows_mask_is_a_window_of_the_dense_mask(kind):
    valid = torch.arange(30)[None, :] >= torch.tensor([[0], [9]])
    bounds = {"window": KeyBounds(window=5), "padding": KeyBounds(key_start=torch.tensor([0, 9]), window=7),
              "tensor": KeyBounds(mask=_dense_mask(valid, 12, None))}[kind]
    dense = bounds.dense_mask(2, 12, 30)[:, 0]
    for rows, keys in (((0, 12), (0, 30)), ((3, 8), (10, 25)), ((4, 12), (16, 34))):  # the last reaches past the keys
        got = bounds.rows_mask(2, 12, 30, rows, keys)
        want = torch.nn.functional.pad(dense, (0, 4), value=False)[:, rows[0]:rows[1], keys[0]:keys[1]]
        assert torch.equal(got, want)


@torch.no_grad()
def test_a_mask_that_sees_later_keys_runs_dense(llama):
    """Image tokens of a multimodal prompt attend within their image (a non-causal mask): sparse methods
    and executors apply the causal rule, so such calls run dense with the model's own mask."""
    n = 128
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    mask[10:30, 10:30] = True  # a block of tokens attending both ways
    mask4d = mask[None, None]
    ids = random_ids(1, n)
    ref = llama(ids, attention_mask=mask4d).logits
    with attnpatch.patch_model(llama, method="a_shape", block_size=16, local_blocks=2) as patch:
        out = llama(ids, attention_mask=mask4d).logits
        reasons = patch.stats().dense_fallbacks
    assert torch.equal(out, ref)
    assert any("not causal" in r for r in reasons)
    assert not key_bounds(mask4d, n, n, None).causal
    assert key_bounds(torch.ones(n, n, dtype=torch.bool).tril()[None, None], n, n, None).causal
