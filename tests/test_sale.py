"""`sale`: the low-bit estimate and relative attention scores against a brute-force definition, the
integer products, per-head thresholds, selection invariants (sinks, diagonal, causal, padding, chunked
prefill, ragged lengths), the dense fallback and the patch."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import left_padded
from method_cases import BOUNDS_CASES, random_qkv

import attnpatch
from attnpatch.backends.reference import block_sparse_attention
from attnpatch.estimators.lowbit import int_dot, quantize, relative_block_scores
from attnpatch.methods.base import DenseFallback, PrefillContext
from attnpatch.methods.prefill.sale import Sale
from attnpatch.sparsity import KeyBounds, num_blocks
from attnpatch.sparsity.regions import allowed_blocks, forced_blocks

BS = 16
BOUNDS = BOUNDS_CASES


_inputs = random_qkv


def _real(bounds, b, lk):
    if bounds.key_valid is not None:
        return bounds.key_valid
    start = bounds.key_start if bounds.key_start is not None else torch.zeros(b, dtype=torch.long)
    return torch.arange(lk)[None] >= start[:, None]


def _reference(q, k, bounds, scale, bs, forced, bits):
    """Block scores written from SALE's definition (materialises Lq × Lk, products in fp64)."""
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    g = hq // hkv
    vis = bounds.dense_mask(b, lq, lk)[:, 0]
    real = _real(bounds, b, lk).float()
    kbar = (k * real[:, None, :, None]).sum(2, keepdim=True) / real.sum(-1).view(b, 1, 1, 1)
    rq = real[:, lk - lq:]
    qbar = (q * rq[:, None, :, None]).sum(2, keepdim=True) / rq.sum(-1).view(b, 1, 1, 1)
    kt, qt = k - kbar, q - qbar
    qmax = 2 ** (bits - 1) - 1

    def quant(x):
        s = x.abs().amax(-1, keepdim=True) / qmax
        return torch.round(x / s).clamp(-qmax, qmax).double(), s.double()

    (qi, sq), (ki, sk) = quant(qt), quant(kt)
    ki, sk, ktr = (t.repeat_interleave(g, 1) for t in (ki, sk, kt))
    est = (qi @ ki.transpose(-1, -2)) * sq * sk.transpose(-1, -2) + qbar.double() @ ktr.double().transpose(-1, -2)
    exact = q.double() @ ktr.double().transpose(-1, -2)
    tok = forced[:, 0].repeat_interleave(bs, 1)[:, :lq].repeat_interleave(bs, 2)[:, :, :lk]  # [B, Lq, Lk]
    ref = (vis & tok)[:, None]
    m = exact.masked_fill(~ref, -math.inf).amax(-1, keepdim=True)
    l_ = torch.exp(scale * (exact - m)).masked_fill(~ref, 0).sum(-1, keepdim=True)
    rel = (torch.exp(scale * (est - m)) / l_).masked_fill(~vis[:, None], 0)
    rr, cc = num_blocks(lq, bs), num_blocks(lk, bs)
    rel = F.pad(rel, (0, cc * bs - lk, 0, rr * bs - lq))
    return rel.view(b, hq, rr, bs, cc, bs).amax((3, 5)).float()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("name", list(BOUNDS))
@pytest.mark.parametrize("lq", [77, 40], ids=["prefill", "chunked"])
def test_estimator_matches_its_definition(name, lq, bits):
    q, k, _ = _inputs(lq=lq)
    bounds = BOUNDS[name]
    forced = forced_blocks(2, lq, 77, BS, BS, bounds, 1, 2)
    want = _reference(q, k, bounds, 0.25, BS, forced, bits)
    for chunk in (1, 1 << 20):  # one query block per chunk, and all at once
        got = relative_block_scores(q, k, bounds, 0.25, BS, forced, bits, chunk_elements=chunk)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_int_dot_is_exact_on_every_path():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (1, 1, 40, 32), dtype=torch.int8, generator=g)
    b = torch.randint(-127, 128, (1, 1, 24, 32), dtype=torch.int8, generator=g)
    want = (a.long() @ b.long().transpose(-1, -2)).float()
    assert torch.equal(int_dot(a, b), want)  # one matrix pair: torch._int_mm
    assert torch.equal(int_dot(a.expand(2, 3, -1, -1), b.expand(2, 3, -1, -1)), want.expand(2, 3, -1, -1))  # batched
    odd = torch.randint(-127, 128, (1, 1, 20, 12), dtype=torch.int8, generator=g)
    assert torch.equal(int_dot(odd, odd), (odd.long() @ odd.long().transpose(-1, -2)).float())


def test_quantize_ranges_and_error():
    x = torch.randn(3, 50, 16)
    for bits, qmax in ((8, 127), (4, 7)):
        v, s = quantize(x, bits)
        assert v.dtype == torch.int8 and int(v.abs().max()) == qmax
        assert ((v.float() * s - x).abs() <= s / 2 + 1e-6).all()
    v, s = quantize(torch.zeros(2, 8), 8)
    assert not v.any() and not s.any()


@pytest.mark.parametrize("name", list(BOUNDS))
@pytest.mark.parametrize("lq", [77, 40], ids=["prefill", "chunked"])
def test_selection_is_the_per_head_threshold_plus_sink_and_local(name, lq):
    q, k, _ = _inputs(lq=lq, seed=1)
    bounds = BOUNDS[name]
    method = Sale(block_size=BS, local_window=24, min_length=0, tau=(0.0, 0.01, 0.1, 1.0))
    sel = method.select(q, k, PrefillContext(0, 0.25, bounds, bounds.window))
    sel.validate()  # ascending, in range, causal
    mask = sel.to_block_mask()
    allowed = allowed_blocks(2, lq, 77, BS, BS, bounds)
    forced = forced_blocks(2, lq, 77, BS, BS, bounds, 1, 2)  # ceil(24 / 16) = 2 local blocks
    scores = _reference(q, k, bounds, 0.25, BS, forced, 8)
    tau = torch.tensor([0.0, 0.01, 0.1, 1.0]).view(1, 4, 1, 1)
    assert torch.equal(mask, ((scores >= tau) | forced) & allowed)
    assert (mask | ~(forced & allowed)).all()  # sink and local band always kept
    assert torch.equal(mask[:, 0], allowed[:, 0])  # tau = 0: every block
    assert not (mask[:, 2] & ~mask[:, 1]).any() and not (mask[:, 3] & ~mask[:, 2]).any()  # higher tau, fewer


def test_a_needle_far_from_sink_and_local_is_kept():
    torch.manual_seed(0)
    d, lk = 16, 320
    k, q = torch.randn(1, 1, lk, d) * 0.3, torch.randn(1, 1, lk, d) * 0.3  # flat attention
    k[0, 0, 100] = torch.randn(d)
    q[0, 0, 300] = 2 * k[0, 0, 100]  # row 300 attends key 100 (block 6); no other row looks there
    sale = Sale(block_size=BS, local_window=32, min_length=0, tau=0.05)
    sel = sale.select(q, k, PrefillContext(0, 1 / math.sqrt(d), KeyBounds(), None))
    mask = sel.to_block_mask()[0, 0]
    assert mask[300 // BS, 100 // BS] and mask.sum() < allowed_blocks(1, lk, lk, BS, BS, KeyBounds()).sum() / 2


def test_padding_keys_and_queries_do_not_influence_the_selection():
    q, k, _ = _inputs(seed=4)
    bounds = BOUNDS["left-padded"]
    ctx = PrefillContext(0, 0.25, bounds, None)
    method = Sale(block_size=BS, local_window=16, min_length=0, tau=0.02)
    q2, k2 = q.clone(), k.clone()
    q2[1, :, :30] = 50 * torch.randn(4, 30, 16)
    k2[1, :, :30] = 50 * torch.randn(2, 30, 16)
    assert torch.equal(method.select(q, k, ctx).to_block_mask(), method.select(q2, k2, ctx).to_block_mask())


def test_full_density_equals_dense_attention():
    q, k, v = _inputs()
    bounds = BOUNDS["left-padded"]
    sel = Sale(block_size=BS, local_window=16, **Sale.full_density).select(q, k, PrefillContext(0, 0.25, bounds, None))
    assert torch.equal(sel.to_block_mask(), allowed_blocks(2, 77, 77, BS, BS, bounds).expand(2, 4, -1, -1))
    out = block_sparse_attention(q, k, v, sel, scale=0.25, bounds=bounds)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bounds.dense_mask(2, 77, 77), scale=0.25, enable_gqa=True)
    torch.testing.assert_close(out[1, :, 30:], ref[1, :, 30:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[0], ref[0], atol=1e-5, rtol=1e-5)


def test_short_inputs_run_dense():
    q, k, _ = _inputs()
    got = Sale().select(q, k, PrefillContext(0, 0.25, KeyBounds(), None))
    assert isinstance(got, DenseFallback) and "min_length=1024" in got.reason
    got = Sale(min_length=0).select(q, k, PrefillContext(0, 0.25, KeyBounds(), None))  # 2 blocks of 64
    assert isinstance(got, DenseFallback) and "fits in sink+local" in got.reason
    assert Sale(block_size=32).local_blocks == 4 and Sale(local_window=130).local_blocks == 3


@torch.no_grad()
def test_runs_through_the_patch_with_padding(llama):
    ids, mask = left_padded(2, 200, [0, 23], seed=2)
    with attnpatch.patch_model(llama, method="sale", block_size=16, local_window=32, min_length=0, tau=0.05) as patch:
        out = llama(ids, attention_mask=mask).logits
        stats = patch.stats()
    assert torch.isfinite(out[mask.bool()]).all()
    assert stats.backends == {"prefill: reference": 2} and 0 < stats.density < 1
    with attnpatch.patch_model(llama, method="sale") as patch:  # default min_length: dense, with the reason
        llama(ids, attention_mask=mask)
        layer = patch.stats().layers[0]
    assert any("min_length=1024" in why for why in layer["dense_fallbacks"])


def test_bf16_inputs_select_like_fp32():
    q, k, _ = _inputs(lq=77, seed=5)
    method = Sale(block_size=BS, local_window=16, min_length=0, tau=0.05)
    ctx = PrefillContext(0, 0.25, BOUNDS["left-padded"], None)
    want = method.select(q, k, ctx).to_block_mask()
    sel = method.select(q.bfloat16(), k.bfloat16(), ctx)
    sel.validate()
    assert (sel.to_block_mask() != want).float().mean() < 0.05
