"""`proxyattn`: the proxy estimator against a brute-force definition, the per-head budget rule, selection
invariants (sinks, diagonal, causal, padding, chunked prefill, ragged lengths, GQA), and the patch."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import left_padded
from method_cases import BOUNDS_CASES, random_qkv

import attnpatch
from attnpatch.backends.reference import block_sparse_attention
from attnpatch.estimators.proxy import coverage_budget, proxy_scores
from attnpatch.methods.base import DenseFallback, PrefillContext
from attnpatch.methods.prefill.proxyattn import ProxyAttn
from attnpatch.sparsity import KeyBounds, num_blocks
from attnpatch.sparsity.regions import allowed_blocks, forced_blocks

BS = 16
BOUNDS = BOUNDS_CASES


_inputs = random_qkv


def _reference(q, k, bounds, scale, bs, sample):
    """Proxy scores and head masses written from their definitions (materialises Lq × Lk)."""
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    g = hq // hkv
    rr, cc = num_blocks(lq, bs), num_blocks(lk, bs)
    vis = bounds.dense_mask(b, lq, lk)[:, 0]  # [B, Lq, Lk]
    logits = q.view(b, hkv, g, lq, d).mean(2) @ k.transpose(-1, -2) * scale
    probs = torch.softmax(logits.masked_fill(~vis[:, None], -math.inf), -1).nan_to_num(0.0)
    head = torch.softmax((q @ k.repeat_interleave(g, 1).transpose(-1, -2) * scale)
                         .masked_fill(~vis[:, None], -math.inf), -1).nan_to_num(0.0)
    proxy, mass = torch.zeros(b, hkv, rr, cc), torch.zeros(b, hq, rr, cc)
    for r in range(rr):
        end = min((r + 1) * bs, lq)
        rows = list(range(max(r * bs, end - min(sample, bs)), end))
        for c in range(cc):
            proxy[:, :, r, c] = probs[:, :, rows, c * bs:(c + 1) * bs].amax((-1, -2))
            mass[:, :, r, c] = head[:, :, end - 1, c * bs:(c + 1) * bs].sum(-1)
    return proxy, mass


@pytest.mark.parametrize("name", list(BOUNDS))
@pytest.mark.parametrize("lq", [77, 40], ids=["prefill", "chunked"])
def test_estimator_matches_its_definition(name, lq):
    q, k, _ = _inputs(lq=lq)
    bounds = BOUNDS[name]
    want_proxy, want_mass = _reference(q, k, bounds, 0.25, BS, 5)
    for chunk in (1, 1 << 20):  # one query block per chunk, and all at once
        proxy, mass = proxy_scores(q, k, bounds, 0.25, BS, 5, chunk_elements=chunk)
        torch.testing.assert_close(proxy, want_proxy, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mass, want_mass, atol=1e-5, rtol=1e-5)


def test_tensor_mask_is_read_at_the_sampled_rows():
    q, k, _ = _inputs()
    closed = BOUNDS["left-padded"]
    as_tensor = KeyBounds(mask=closed.dense_mask(2, 77, 77))
    for got, want in zip(proxy_scores(q, k, as_tensor, 0.25, BS, 4), proxy_scores(q, k, closed, 0.25, BS, 4),
                         strict=True):
        torch.testing.assert_close(got, want)


def _selection_by_definition(method, q, k, bounds, estimator=proxy_scores):
    """The kept blocks, from the estimator's outputs and the rule written out per (batch, head, row)."""
    b, hq, lq, _ = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    bs = method.block_size
    proxy, mass = estimator(q, k, bounds, 0.25, bs, method.sample)
    allowed = allowed_blocks(b, lq, lk, bs, bs, bounds)
    forced = forced_blocks(b, lq, lk, bs, bs, bounds, method.sink_blocks, method.local_blocks) & allowed
    per = lambda v: v if isinstance(v, tuple) else (v,) * hq  # noqa: E731
    gamma, lo, hi = per(method.gamma), per(method.min_blocks), per(method.max_blocks)
    want = torch.zeros(b, hq, allowed.shape[2], allowed.shape[3], dtype=torch.bool)
    for bi in range(b):
        for h in range(hq):
            for r in range(allowed.shape[2]):
                cols = [c for c in range(allowed.shape[3]) if allowed[bi, 0, r, c]]
                order = sorted(cols, key=lambda c: (-float(proxy[bi, h // (hq // hkv), r, c]), c))
                m = sorted(mass[bi, h, r].tolist(), reverse=True)
                need = sum(1 for j in range(len(m)) if sum(m[:j]) < gamma[h] * sum(m))
                budget = math.ceil(max(min(need, hi[h]), lo[h]))
                for c in order[:budget]:
                    want[bi, h, r, c] = True
    return want | forced


@pytest.mark.parametrize("name", list(BOUNDS))
@pytest.mark.parametrize("lq", [77, 40], ids=["prefill", "chunked"])
def test_selection_follows_the_rule_and_keeps_sink_diagonal_and_causality(name, lq):
    q, k, _ = _inputs(lq=lq, seed=1)
    bounds = BOUNDS[name]
    method = ProxyAttn(block_size=BS, sample=6, gamma=(0.3, 0.6, 0.9, 1.0), min_blocks=(0.0, 1.0, 2.0, 0.0),
                       max_blocks=(1.0, 3.0, 100.0, 2.0))
    sel = method.select(q, k, PrefillContext(0, 0.25, bounds, bounds.window))
    sel.validate()  # ascending, in range, causal
    mask = sel.to_block_mask()
    assert torch.equal(mask, _selection_by_definition(method, q, k, bounds))
    allowed = allowed_blocks(2, lq, 77, BS, BS, bounds)
    assert not (mask & ~allowed).any()
    forced = forced_blocks(2, lq, 77, BS, BS, bounds, 1, method.local_blocks) & allowed
    assert (mask | ~forced).all()  # sink and diagonal always kept
    extra = (mask & ~forced).sum(-1)
    assert (extra[:, 0] <= 1).all() and (extra[:, 1] <= 3).all() and (extra[:, 3] <= 2).all()  # max_blocks


@pytest.mark.parametrize("name", list(BOUNDS))
@pytest.mark.parametrize("seed", [2, 3, 4])
def test_selection_equals_the_materialised_softmax_reference(name, seed):
    """The block-statistics estimator (no softmax materialised, causal mask on the diagonal band only)
    selects exactly what the Lq × Lk softmax of the definition selects, over many chunks."""
    q, k, _ = random_qkv(lq=150, lk=150, seed=seed, planted=seed == 3)
    bounds = {"left-padded": KeyBounds(key_start=torch.tensor([0, 30])),
              "key-valid": KeyBounds(key_valid=torch.arange(150).view(1, -1).expand(2, -1) % 13 != 5)
              }.get(name, BOUNDS[name])
    method = ProxyAttn(block_size=BS, sample=5, gamma=(0.5, 0.8, 0.9, 0.95), min_blocks=1.0)
    ctx = PrefillContext(0, 0.25, bounds, bounds.window)
    want = _selection_by_definition(method, q, k, bounds, estimator=_reference)
    assert torch.equal(method.select(q, k, ctx).to_block_mask(), want)
    for chunk in (1, 3000):  # one query block per chunk, a few per chunk
        got, ref = proxy_scores(q, k, bounds, 0.25, BS, 5, chunk_elements=chunk), _reference(q, k, bounds, 0.25, BS, 5)
        for a, e in zip(got, ref, strict=True):
            torch.testing.assert_close(a, e, atol=1e-6, rtol=1e-5)


def test_budget_rule():
    mass = torch.tensor([[[[0.5, 0.3, 0.1, 0.1, 0.0]]]]).expand(1, 4, 1, 5)
    got = coverage_budget(mass, torch.tensor([0.5, 0.8, 0.81, 1.0]), torch.zeros(4), torch.full((4,), 9.0))
    assert got.flatten().tolist() == [1, 2, 3, 4]  # the zero-mass block is never needed
    got = coverage_budget(mass, torch.full((4,), 0.5), torch.tensor([0.0, 2.0, 3.5, 4.0]),
                          torch.tensor([0.0, 1.0, 9.0, 9.0]))
    assert got.flatten().tolist() == [0, 2, 4, 4]  # clamped; min_blocks wins; fractions round up


def test_budget_follows_each_heads_concentration():
    """Same ranking for the group, but a head whose attention is concentrated keeps fewer blocks."""
    torch.manual_seed(0)
    d, lk = 16, 256
    k = torch.randn(1, 1, lk, d)
    q = torch.randn(1, 2, lk, d) * 0.05
    q[:, 0] += 3 * k[:, 0, 40]  # head 0 stares at one key; head 1 is diffuse
    sel = ProxyAttn(block_size=BS, gamma=0.9, min_blocks=0.0).select(q, k, PrefillContext(0, 0.25, KeyBounds(), None))
    counts = sel.counts[0, :, -4:].float().mean(-1)
    assert counts[0] < counts[1] / 2
    assert sel.to_block_mask()[0, 0, 4:, 40 // BS].all()  # the stared-at block is kept by every later row


def test_gqa_heads_share_the_ranking_so_selections_nest():
    q, k, _ = _inputs(hq=6, hkv=2, seed=3)
    sel = ProxyAttn(block_size=BS, gamma=0.0, min_blocks=(1.0, 2.0, 4.0) * 2, max_blocks=0.0).select(
        q, k, PrefillContext(0, 0.25, KeyBounds(), None))
    m = sel.to_block_mask()
    for grp in (0, 3):
        assert not (m[:, grp] & ~m[:, grp + 1]).any() and not (m[:, grp + 1] & ~m[:, grp + 2]).any()


def test_padding_keys_and_queries_do_not_influence_the_selection():
    q, k, _ = _inputs(seed=4)
    bounds = BOUNDS["left-padded"]
    ctx = PrefillContext(0, 0.25, bounds, None)
    method = ProxyAttn(block_size=BS, sample=4, gamma=0.7, min_blocks=1.0)
    q2, k2 = q.clone(), k.clone()
    q2[1, :, :30] = 50 * torch.randn(4, 30, 16)
    k2[1, :, :30] = 50 * torch.randn(2, 30, 16)
    assert torch.equal(method.select(q, k, ctx).to_block_mask(), method.select(q2, k2, ctx).to_block_mask())


def test_full_density_equals_dense_attention():
    q, k, v = _inputs(lq=77, lk=77)
    bounds = BOUNDS["left-padded"]
    method = ProxyAttn(block_size=BS, **ProxyAttn.full_density)
    sel = method.select(q, k, PrefillContext(0, 0.25, bounds, None))
    assert torch.equal(sel.to_block_mask(), allowed_blocks(2, 77, 77, BS, BS, bounds).expand(2, 4, -1, -1))
    out = block_sparse_attention(q, k, v, sel, scale=0.25, bounds=bounds)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bounds.dense_mask(2, 77, 77), scale=0.25, enable_gqa=True)
    torch.testing.assert_close(out[1, :, 30:], ref[1, :, 30:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[0], ref[0], atol=1e-5, rtol=1e-5)


def test_declines_when_input_fits_in_sink_plus_local():
    q = torch.randn(1, 2, 30, 8)
    got = ProxyAttn(block_size=16).select(q, q[:, :1], PrefillContext(0, 1.0, KeyBounds(), None))
    assert isinstance(got, DenseFallback) and "fits" in got.reason


@torch.no_grad()
def test_runs_through_the_patch_with_padding(llama):
    ids, mask = left_padded(2, 200, [0, 23], seed=2)
    with attnpatch.patch_model(llama, method="proxyattn", block_size=16, gamma=0.5, min_blocks=1) as patch:
        out = llama(ids, attention_mask=mask).logits
        stats = patch.stats()
    assert torch.isfinite(out[mask.bool()]).all()
    assert stats.backends == {"prefill: reference": 2} and 0 < stats.density < 1
    assert all(layer["select_ms"] > 0 for layer in stats.layers)


def test_bf16_inputs_select_like_fp32():
    q, k, _ = _inputs(lq=77, seed=5)
    method = ProxyAttn(block_size=BS, gamma=0.8, min_blocks=1.0)
    ctx = PrefillContext(0, 0.25, BOUNDS["left-padded"], None)
    want = method.select(q, k, ctx).to_block_mask()
    sel = method.select(q.bfloat16(), k.bfloat16(), ctx)
    sel.validate()
    assert (sel.to_block_mask() != want).float().mean() < 0.05
