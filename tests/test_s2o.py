"""`s2o`: the importance-ordered selection with early stop against a brute-force restatement, its
invariants (sink/local kept, causal, padding, per-head τ, the key cap), full density, and the patch."""

import pytest
import torch
import torch.nn.functional as F
from method_cases import prefill_ctx, random_qkv, token_lists

from attnpatch.backends.reference import token_gather_attention
from attnpatch.methods.base import DenseFallback
from attnpatch.methods.prefill.s2o import S2OPrefill
from attnpatch.registry import get_method
from attnpatch.sparsity import KeyBounds, num_blocks
from attnpatch.sparsity.tokens import block_key_mask, validate_tokens

SCALE = 0.5
BQ, POOL = 8, 4


def _inputs(b=2, hq=4, hkv=2, lq=77, lk=77, d=16, seed=0):
    return random_qkv(b, hq, hkv, lq, lk, d, seed, planted=True)


def _ctx(bounds=None):
    return prefill_ctx(SCALE, bounds)


_lists = token_lists


def _importance(q, k, bi, h, r, s0, bq=BQ, pool=POOL):
    """`I [Lk]` (float64) of block `r`: mean over its pooled sub-blocks of the softmax of pooled scores."""
    lq, lk = q.shape[2], k.shape[2]
    off, kk = lk - lq, k[bi, h // (q.shape[1] // k.shape[1])].double()
    probs = []
    for sub in range(r * bq // pool, (r + 1) * bq // pool):
        rows = [i for i in range(sub * pool, min((sub + 1) * pool, lq)) if off + i >= s0]
        if not rows:
            continue
        last = off + min((sub + 1) * pool, lq) - 1
        s = SCALE * (kk @ q[bi, h, rows].double().mean(0))
        vis = (torch.arange(lk) <= last) & (torch.arange(lk) >= s0)
        probs.append(torch.softmax(s.masked_fill(~vis, float("-inf")), 0))
    return torch.stack(probs).mean(0) if probs else torch.zeros(lk, dtype=torch.float64)


def _brute(q, k, tau, ks, sink=1, local=1, bq=BQ, pool=POOL):
    b, hq, lq, _ = q.shape
    lk = k.shape[2]
    off, out = lk - lq, []
    for bi in range(b):
        s0, heads = int(ks[bi]), []
        for h in range(hq):
            lists = []
            for r in range(num_blocks(lq, bq)):
                first, last = off + r * bq, off + min((r + 1) * bq, lq) - 1
                imp = _importance(q, k, bi, h, r, s0, bq, pool)
                forced = {j for j in range(s0, last + 1) if j < s0 + sink * bq or j >= first - local * bq}
                cand = sorted((j for j in range(s0, last + 1) if j not in forced), key=lambda j: -float(imp[j]))
                total = float(imp.sum())
                residual = total - sum(float(imp[j]) for j in forced)
                kept = []
                for t in range(0, len(cand), bq):
                    if max(residual, 0.0) < tau[h] * total:
                        break
                    kept += cand[t:t + bq]
                    residual -= sum(float(imp[j]) for j in cand[t:t + bq])
                lists.append(sorted(forced | set(kept)))
            heads.append(lists)
        out.append(heads)
    return out


TAUS = (0.0, 0.03, 0.2, 0.6)


@pytest.mark.parametrize(("lq", "lk"), [(77, 77), (45, 77), (64, 64)], ids=["ragged", "chunked", "aligned"])
@pytest.mark.parametrize("padded", [False, True], ids=["plain", "left-padded"])
def test_matches_brute_force(lq, lk, padded):
    q, k, _ = _inputs(lq=lq, lk=lk)
    ks = torch.tensor([0, 21]) if padded else torch.zeros(2, dtype=torch.long)
    bounds = KeyBounds(key_start=ks) if padded else KeyBounds()
    sel = S2OPrefill(block_size=BQ, pool_size=POOL, tau=TAUS).select(q, k, _ctx(bounds))
    validate_tokens(sel)
    assert _lists(sel) == _brute(q, k, TAUS, ks)
    per_head = sel.counts.sum((0, 2))
    assert per_head[0] == per_head.max() > per_head[3]  # τ per head: τ = 0 keeps every key, 0.6 far fewer


def test_residual_below_tau_and_stop_is_earliest():
    """Per block: the estimated mass left out is below τ, and without the last kept virtual block it
    would not be (the stop is the first virtual block whose residual falls below τ)."""
    q, k, _ = _inputs()
    tau = 0.1
    sel = S2OPrefill(block_size=BQ, pool_size=POOL, tau=tau).select(q, k, _ctx())
    lists = _lists(sel)
    dropped_any = False
    for bi in range(2):
        for h in range(4):
            for r, keys in enumerate(lists[bi][h]):
                imp = _importance(q, k, bi, h, r, 0)
                last = min((r + 1) * BQ, 77) - 1
                left_out = float(imp[:last + 1].sum() - imp[keys].sum())
                forced = {j for j in range(last + 1) if j < BQ or j >= r * BQ - BQ}
                extra = sorted(set(keys) - forced, key=lambda j: float(imp[j]))  # kept candidates, least first
                if len(keys) < last + 1:
                    dropped_any = True
                    assert left_out < tau
                if extra:
                    last_block = extra[:len(extra) % BQ or BQ]
                    assert left_out + float(imp[last_block].sum()) >= tau - 1e-6
    assert dropped_any


def test_sink_and_local_kept_padding_never_listed_and_padding_never_matters():
    q, k, _ = _inputs()
    ks = torch.tensor([0, 21])
    method = S2OPrefill(block_size=BQ, pool_size=POOL, tau=0.5, sink_blocks=1, local_blocks=2)
    sel = method.select(q, k, _ctx(KeyBounds(key_start=ks)))
    for bi, heads in enumerate(_lists(sel)):
        for lists in heads:
            for r, keys in enumerate(lists):
                first, last = r * BQ, min((r + 1) * BQ, 77) - 1
                assert all(j >= ks[bi] for j in keys)
                want = {j for j in range(int(ks[bi]), last + 1) if j < ks[bi] + BQ or j >= first - 2 * BQ}
                assert want <= set(keys)
    q2, k2 = q.clone(), k.clone()
    q2[1, :, :21] = 100.0
    k2[1, :, :21] = -100.0
    assert _lists(method.select(q2, k2, _ctx(KeyBounds(key_start=ks)))) == _lists(sel)


def test_key_cap_truncates_the_importance_order():
    q, k, _ = _inputs(lq=120, lk=120)
    forced = 3 * BQ
    capped = S2OPrefill(block_size=BQ, pool_size=POOL, tau=0.0, max_keys=forced + 5).select(q, k, _ctx())
    free = S2OPrefill(block_size=BQ, pool_size=POOL, tau=0.0).select(q, k, _ctx())
    validate_tokens(capped)
    assert int(capped.counts.max()) <= forced + 5 < int(free.counts.max())
    for a, b in zip(sum(sum(_lists(capped), []), []), sum(sum(_lists(free), []), []), strict=True):
        assert set(a) <= set(b)
    with pytest.raises(ValueError, match="max_keys"):
        S2OPrefill(block_size=BQ, max_keys=forced - 1)


def test_window_and_key_validity_are_clipped():
    q, k, _ = _inputs()
    valid = torch.ones(2, 77, dtype=torch.bool)
    valid[1, 40:44] = False
    for bounds in (KeyBounds(window=20), KeyBounds(key_valid=valid), KeyBounds(key_start=torch.tensor([3, 9]),
                                                                             window=30)):
        sel = S2OPrefill(block_size=BQ, pool_size=POOL, tau=0.05).select(q, k, _ctx(bounds))
        validate_tokens(sel)
        visible = block_key_mask(bounds, 2, 77, 77, BQ, 0, num_blocks(77, BQ))
        listed = torch.zeros(2, 4, num_blocks(77, BQ), 78, dtype=torch.bool)
        idx = torch.where(torch.arange(sel.indices.shape[-1]) < sel.counts.unsqueeze(-1), sel.indices.long(), 77)
        listed.scatter_(-1, idx, True)
        assert not (listed[..., :77] & ~visible).any()


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("lq", [77, 45], ids=["prefill", "chunked"])
def test_full_density_equals_dense(padded, lq):
    q, k, v = _inputs(lq=lq)
    bounds = KeyBounds(key_start=torch.tensor([0, 21])) if padded else KeyBounds()
    sel = S2OPrefill(block_size=BQ, pool_size=POOL, **S2OPrefill.full_density).select(q, k, _ctx(bounds))
    out = token_gather_attention(q, k, v, sel, scale=SCALE, bounds=bounds)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bounds.dense_mask(2, lq, 77), scale=SCALE,
                                         enable_gqa=True)
    rows = (torch.arange(lq) + 77 - lq >= (21 if padded else 0)).view(1, 1, lq).expand(2, 4, lq).clone()
    rows[0] = True
    torch.testing.assert_close(out[rows], ref[rows], atol=1e-5, rtol=1e-5)
    kept, total = sel.kept_and_total()
    if not padded:
        assert torch.equal(kept, total)


def test_short_inputs_fall_back_dense_and_options_are_checked():
    q, k, _ = _inputs(lq=24, lk=24)
    got = S2OPrefill(block_size=BQ).select(q, k, _ctx())
    assert isinstance(got, DenseFallback) and "sink and local" in got.reason
    info = get_method("s2o", "prefill")
    for bad in ({"tau": 1.5}, {"pool_size": 12}, {"block_size": 8}):
        with pytest.raises(ValueError):
            info.build(bad)
    assert info.build({"tau": [0.0, 0.1, 0.2, 0.3]}, heads=4).tau == (0.0, 0.1, 0.2, 0.3)
    big_pool = S2OPrefill(block_size=BQ, pool_size=64, tau=0.1).select(*_inputs()[:2], _ctx())  # pool ≤ block
    validate_tokens(big_pool)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_through_the_patch_on_tiny_models(family):
    from conftest import left_padded

    import attnpatch
    from attnpatch.testing import tiny_model

    model = tiny_model(family)
    ids, mask = left_padded(2, 200, [0, 23], seed=1)
    valid = mask.bool()
    opts = dict(block_size=16, pool_size=8, tau=0.1)
    with torch.no_grad():
        dense = model(ids, attention_mask=mask).logits
        with attnpatch.patch_model(model, method="s2o", **opts) as patch:
            out = model(ids, attention_mask=mask).logits
            stats = patch.stats()
        with attnpatch.patch_model(model, method="s2o", **dict(opts, **S2OPrefill.full_density)):
            exact = model(ids, attention_mask=mask).logits
    assert torch.isfinite(out[valid]).all() and stats.backends == {"prefill: reference": 2}
    assert 0 < stats.density < 1 and not stats.dense_fallbacks and stats.select_ms > 0
    torch.testing.assert_close(exact[valid], dense[valid], atol=2e-5, rtol=1e-4)
