"""`a_shape` against a dense masked computation written here, at the kernel and at the model level."""

import torch
import torch.nn.functional as F
from conftest import left_padded, random_ids
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import attnpatch
from attnpatch.adapters import get_adapter
from attnpatch.methods.base import DenseFallback, PrefillContext
from attnpatch.methods.prefill.a_shape import AShape
from attnpatch.sparsity import KeyBounds

BS, SINK, LOCAL = 16, 1, 2


def a_shape_token_mask(lq, lk, key_start, bs=BS, sink=SINK, local=LOCAL):
    """[B, Lq, Lk] bool: for each query, the keys A-shape keeps, written out with plain loops."""
    off = lk - lq
    out = torch.zeros(len(key_start), lq, lk, dtype=torch.bool)
    for b, start in enumerate(key_start):
        for i in range(lq):
            r = i // bs
            first, last = off + r * bs, off + min((r + 1) * bs, lq) - 1
            for j in range(off + i + 1):
                jb = j // bs
                in_local = first // bs - (local - 1) <= jb <= last // bs and (jb + 1) * bs - 1 >= start
                in_sink = sink > 0 and start // bs <= jb <= (start + sink * bs - 1) // bs
                out[b, i, j] = in_local or in_sink
    return out


def test_selection_matches_definition_with_offset_and_padding():
    q, k = torch.randn(2, 4, 37, 8), torch.randn(2, 2, 101, 8)
    starts = torch.tensor([0, 21])
    sel = AShape(block_size=BS, sink_blocks=SINK, local_blocks=LOCAL).select(
        q, k, PrefillContext(0, 1.0, KeyBounds(key_start=starts), None))
    sel.validate()
    from test_reference_executor import token_mask_of

    got = token_mask_of(sel, 37, 101)[:, 0]
    assert torch.equal(got, a_shape_token_mask(37, 101, starts.tolist()))
    assert torch.equal(sel.indices[:, 0], sel.indices[:, 3])  # same selection for every head


def test_declines_when_input_fits_in_sink_plus_local():
    q = torch.randn(1, 2, 40, 8)
    got = AShape(block_size=16, sink_blocks=1, local_blocks=2).select(
        q, q[:, :1], PrefillContext(0, 1.0, KeyBounds(), None))
    assert isinstance(got, DenseFallback) and "fits" in got.reason


def _register_reference(name):
    """A test-made attention: SDPA with the A-shape token mask ANDed into transformers' mask."""

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        b, lq, lk = query.shape[0], query.shape[2], key.shape[2]
        # each row's first real token: the first key any query may see (never a window's start)
        starts = [0] * b if attention_mask is None else attention_mask[:, 0].any(-2).int().argmax(-1).tolist()
        m = a_shape_token_mask(lq, lk, starts)[:, None]
        if attention_mask is not None:
            m = m & attention_mask
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=m, scale=scaling, enable_gqa=True)
        return out.nan_to_num(0.0).transpose(1, 2).contiguous(), None

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, sdpa_mask)


@torch.no_grad()
def test_model_logits_match_dense_masked_reference(tiny):
    ids, mask = left_padded(2, 100, [0, 23], seed=4)
    _register_reference("test_ashape_reference")
    tiny.set_attn_implementation("test_ashape_reference")
    ref = tiny(ids, attention_mask=mask).logits
    tiny.set_attn_implementation("sdpa")
    dense = tiny(ids, attention_mask=mask).logits
    with attnpatch.patch_model(tiny, method="a_shape", block_size=BS, sink_blocks=SINK, local_blocks=LOCAL) as patch:
        out = tiny(ids, attention_mask=mask).logits
        stats = patch.stats()
    valid = mask.bool()
    torch.testing.assert_close(out[valid], ref[valid], atol=2e-5, rtol=1e-4)
    windows = get_adapter(tiny.config).sliding_windows(tiny.config)
    if any(w is None for w in windows):  # with a window of 8 everywhere, A-shape (32 local tokens) is exact
        assert not torch.allclose(out[valid], dense[valid], atol=1e-3)  # really sparse, not dense in disguise
    assert 0 < stats.density < 1
    assert all(0 < d["density"] < 1 for d in stats.layers)


@torch.no_grad()
def test_stats_report_per_head_density_and_fallbacks(llama):
    with attnpatch.patch_model(llama, method="a_shape", block_size=16, sink_blocks=1, local_blocks=2) as patch:
        llama(random_ids(1, 128))
        llama(random_ids(1, 30))  # fits in sink + local: dense fallback with a reason
        layer = patch.stats().layers[0]
    assert layer["prefill_calls"] == 2
    assert len(layer["density_per_head"]) == 4
    # 8 query blocks: blocks kept = 1+2+3+3+3+3+3+3 = 21 of 36 causal pairs; the fallback adds 3 of 3.
    assert layer["kept_blocks"] == (21 + 3) * 4 and layer["total_blocks"] == (36 + 3) * 4
    (reason, count), = layer["dense_fallbacks"].items()
    assert count == 1 and "fits in sink+local" in reason


@torch.no_grad()
def test_sliding_window_layer_keeps_the_sink_at_the_first_real_token():
    """On a window layer the sink is each row's first real token, clipped by the window — not the
    window's start (which the last query row's mask would suggest)."""
    from attnpatch.testing import tiny_model

    model = tiny_model("mistral", sliding_window=64)
    ids, mask = left_padded(2, 160, [0, 21], seed=9)
    _register_reference("test_ashape_reference_swa")
    model.set_attn_implementation("test_ashape_reference_swa")
    ref = model(ids, attention_mask=mask).logits
    model.set_attn_implementation("sdpa")
    with attnpatch.patch_model(model, method="a_shape", block_size=BS, sink_blocks=SINK, local_blocks=LOCAL):
        out = model(ids, attention_mask=mask).logits
        unpadded = model(ids[:1]).logits
    valid = mask.bool()
    torch.testing.assert_close(out[valid], ref[valid], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(unpadded[0], ref[0], atol=2e-5, rtol=1e-4)
