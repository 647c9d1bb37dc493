"""`flexprefill`: the selection against a per-head reference written from the algorithm (loops over
batch rows and heads, full attention), per-head γ / τ, budgets, padding, chunked prefill, dense
fallbacks, and runs through the patch (with a KV cache: chunked prefill)."""

import math

import pytest
import torch
from conftest import cache_arg, left_padded
from transformers import DynamicCache

import attnpatch
from attnpatch.methods.base import DenseFallback, PrefillContext
from attnpatch.methods.prefill.flexprefill import FlexPrefill
from attnpatch.sparsity import KeyBounds, num_blocks
from attnpatch.sparsity.regions import allowed_blocks, forced_blocks, query_block_span

B, HQ, HKV, D, BS = 2, 4, 2, 16, 16
BOUNDS = {"plain": KeyBounds(), "left-padded": KeyBounds(key_start=torch.tensor([0, 37]))}


def _inputs(lq, lk, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, HQ, lq, D, generator=g), torch.randn(B, HKV, lk, D, generator=g)
    k[:, :, 5] *= 4  # a strong column, so some heads are vertical-slash heads
    return q, k


def _cover(x, gamma):
    if gamma >= 1:
        return x.numel()
    cs = x.sort(descending=True).values.cumsum(0)
    return int((cs < gamma * x.sum()).sum()) + 1


def reference(q, k, scale, bounds, gamma, tau, min_budget, max_budget):
    """[B, Hq, R, C] kept blocks before the base's forced regions, one (row, head) at a time."""
    lq, lk = q.shape[2], k.shape[2]
    n, r, c = min(BS, lq), num_blocks(lq, BS), num_blocks(lk, BS)
    lo = max(1, math.ceil(min_budget / BS))
    hi = min(c, math.ceil(max_budget / BS)) if max_budget else c
    visible = bounds.dense_mask(B, lq, lk)
    allowed = allowed_blocks(B, lq, lk, BS, BS, bounds)
    start = bounds.first_key(B, "cpu")
    _, last_q = query_block_span(lq, lk, BS)
    out = torch.zeros(B, HQ, r, c, dtype=torch.bool)
    for b in range(B):
        real = torch.arange(lk) >= start[b]
        for h in range(HQ):
            kh = k[b, h // (HQ // HKV)]
            s = (q[b, h, -n:] @ kh.T * scale).masked_fill(~visible[b, 0, -n:], float("-inf"))
            p = torch.softmax(s, -1)
            vertical = p.mean(0)
            key_of = torch.arange(lk - n, lk).view(-1, 1) - torch.arange(lk).view(1, -1)  # [n, offset] -> key
            slash = (p.gather(-1, key_of.clamp(min=0)) * (key_of >= 0)).sum(0) / n
            nv = min(max(_cover(vertical, gamma[h]) // BS + 1, lo), hi)
            ns = min(max(_cover(slash, gamma[h]) // BS + 1, lo), hi)
            vb = torch.stack([vertical[j * BS:(j + 1) * BS].sum() for j in range(c)])
            sb = torch.stack([slash[j * BS:(j + 1) * BS].sum() for j in range(c)])
            pk = torch.stack([kh[j * BS:(j + 1) * BS][real[j * BS:(j + 1) * BS]].mean(0)
                              if real[j * BS:(j + 1) * BS].any() else torch.zeros(D) for j in range(c)])
            has_real = torch.tensor([bool(real[j * BS:(j + 1) * BS].any()) for j in range(c)])
            est = torch.softmax((q[b, h, -n:].mean(0) @ pk.T * scale).masked_fill(~has_real, float("-inf")), 0)
            m = (est + vb) / 2
            js = math.sqrt(max(0.0, float(0.5 * torch.xlogy(est, est / m).sum() + 0.5 * torch.xlogy(vb, vb / m).sum())))
            aware = js < tau[h]
            if aware:
                nv = ns = lo
            vb[start[b] // BS] = float("inf")
            sb[0] = float("inf")
            vtop, stop = set(vb.topk(nv).indices.tolist()), set(sb.topk(ns).indices.tolist())
            for i in range(r):
                for j in range(c):
                    d = int(last_q[i]) // BS - j
                    out[b, h, i, j] = j in vtop or (d >= 0 and d in stop)
            if aware:
                pq = torch.stack([q[b, h, i * BS:(i + 1) * BS][real[lk - lq + i * BS:lk - lq + (i + 1) * BS]].mean(0)
                                  if real[lk - lq + i * BS:lk - lq + (i + 1) * BS].any() else torch.zeros(D)
                                  for i in range(r)])
                att = torch.softmax((pq @ pk.T * scale).masked_fill(~allowed[b, 0], float("-inf")), -1)
                att = att.nan_to_num(0.0).flatten()
                values, order = att.sort(descending=True)
                before = values.cumsum(0) - values
                chosen = order[(before < gamma[h] * att.sum()) | (gamma[h] >= 1)]
                flat = out[b, h].flatten()
                flat[chosen] = True
                out[b, h] = flat.view(r, c)
    return out


@pytest.mark.parametrize("name", list(BOUNDS))
@pytest.mark.parametrize("lq,lk", [(200, 200), (77, 203)], ids=["prefill", "chunked"])
def test_selection_matches_the_reference_per_head(name, lq, lk):
    bounds = BOUNDS[name]
    q, k = _inputs(lq, lk)
    gamma, tau = (0.5, 0.9, 0.7, 0.95), (0.0, 1.0, 0.14, 1.0)  # 1, 3 query-aware; 2 in some rows
    method = FlexPrefill(gamma=gamma, tau=tau, min_budget=BS, max_budget=0, block_size=BS)
    sel = method.select(q, k, PrefillContext(0, 0.25, bounds, None))
    sel.validate()
    mask = sel.to_block_mask()
    allowed = allowed_blocks(B, lq, lk, BS, BS, bounds)
    forced = forced_blocks(B, lq, lk, BS, BS, bounds, 1, 1) & allowed
    want = (reference(q, k, 0.25, bounds, gamma, tau, BS, 0) | forced) & allowed
    assert torch.equal(mask, want)
    assert (mask | ~forced).all() and 0 < sel.density_per_head().min() < 1


def test_budgets_are_clamped_and_query_aware_heads_cover_gamma_of_the_pooled_mass():
    from attnpatch.estimators.pooled import pooled_block_attention

    q, k = _inputs(256, 256, seed=1)
    ctx = PrefillContext(0, 0.25, KeyBounds(), None)
    capped = FlexPrefill(gamma=0.99, tau=0.0, min_budget=BS, max_budget=2 * BS, block_size=BS).select(q, k, ctx)
    # two vertical blocks and two block-diagonals at most (the first and the diagonal among them)
    assert (capped.counts <= 4).all() and (capped.counts >= 1).all()
    aware = FlexPrefill(gamma=0.8, tau=1.0, min_budget=BS, block_size=BS).select(q, k, ctx).to_block_mask()
    pooled = pooled_block_attention(q, k, 0.25, KeyBounds(), BS)
    assert ((pooled * aware).sum(dim=(2, 3)) >= 0.8 * pooled.sum(dim=(2, 3)) - 1e-5).all()


def test_short_inputs_cap_the_least_budget_or_run_dense():
    q, k = _inputs(300, 300)
    ctx = PrefillContext(0, 0.25, KeyBounds(), None)
    got = FlexPrefill(block_size=16, max_share=1.0).select(q, k, ctx)  # as the original: 512 > 300 keys
    assert isinstance(got, DenseFallback) and "min_budget" in got.reason
    capped = FlexPrefill(block_size=16).select(q, k, ctx)  # least budget: 150 tokens
    assert torch.equal(capped.to_block_mask(),
                       FlexPrefill(block_size=16, min_budget=150).select(q, k, ctx).to_block_mask())
    assert isinstance(FlexPrefill(block_size=128, min_budget=0).select(q[:, :, :256], k[:, :, :256], ctx),
                      DenseFallback)  # two blocks


@torch.no_grad()
def test_through_the_patch_with_padding_and_a_kv_cache(llama):
    ids, mask = left_padded(2, 300, [0, 37], seed=5)
    opts = dict(block_size=BS, min_budget=32, gamma=(0.8, 0.9, 0.9, 0.95), tau=(0.0, 0.1, 0.5, 1.0))
    dense = llama(ids, attention_mask=mask).logits
    with attnpatch.patch_model(llama, method="flexprefill", **opts) as patch:
        out = llama(ids, attention_mask=mask).logits
        cache = DynamicCache(config=llama.config)  # passed in, not read back from the output (5.40 drops that)
        llama(ids[:, :180], attention_mask=mask[:, :180], **cache_arg(llama, cache))
        second = llama(ids[:, 180:], attention_mask=mask, **cache_arg(llama, cache)).logits
        stats = patch.stats()
    valid = mask.bool()
    assert torch.isfinite(out[valid]).all() and torch.isfinite(second[valid[:, 180:]]).all()
    assert 0 < stats.density < 1 and not stats.dense_fallbacks
    assert (out[valid] - dense[valid]).abs().max() < 1.0
    with attnpatch.patch_model(llama, method="flexprefill", block_size=BS, **FlexPrefill.full_density):
        cache = DynamicCache(config=llama.config)
        llama(ids[:, :180], attention_mask=mask[:, :180], **cache_arg(llama, cache))
        exact = llama(ids[:, 180:], attention_mask=mask, **cache_arg(llama, cache)).logits
    torch.testing.assert_close(exact[valid[:, 180:]], dense[:, 180:][valid[:, 180:]], atol=2e-5, rtol=1e-4)
