"""`anchor` (AnchorAttention): the selection against a brute-force restatement of the algorithm, its
invariants (init/local kept, causal, padding, per-head θ, the key cap), full density, and the patch."""

import math

import pytest
import torch
import torch.nn.functional as F
from method_cases import prefill_ctx, random_qkv, token_lists

from attnpatch.backends.reference import token_gather_attention
from attnpatch.methods.base import DenseFallback
from attnpatch.methods.prefill.anchor import AnchorPrefill
from attnpatch.registry import get_method
from attnpatch.sparsity import KeyBounds, num_blocks
from attnpatch.sparsity.tokens import block_key_mask, validate_tokens

SCALE = 0.25
BQ, STEP = 8, 2  # 16-token big blocks: small inputs span many of them


def _inputs(b=2, hq=4, hkv=2, lq=77, lk=77, d=16, seed=0):
    return random_qkv(b, hq, hkv, lq, lk, d, seed, planted=True)


def _ctx(bounds=None):
    return prefill_ctx(SCALE, bounds)


_lists = token_lists


def _brute(q, k, theta, ks, init_blocks=1, local_blocks=1, bq=BQ, step=STEP, sliding=False):
    """The algorithm restated per (batch, head, block) with loops and full score rows."""
    b, hq, lq, _ = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    off, big, n_r = lk - lq, bq * step, num_blocks(lq, bq)
    out = []
    for bi in range(b):
        s0 = int(ks[bi])
        init_end = s0 + min(init_blocks * big, lk)
        heads = []
        for h in range(hq):
            kk = k[bi, h // (hq // hkv)]
            blocks, abar, qbar = [], [], []
            for r in range(n_r):
                last = off + min((r + 1) * bq, lq) - 1
                local_start = max(last + 1 - local_blocks * big if sliding else
                                  off + (r // step) * big - (local_blocks - 1) * big, 0)
                rows = [i for i in range(r * bq, min((r + 1) * bq, lq)) if off + i >= s0]
                maxima = []
                for i in rows:
                    pos = off + i
                    keys = [j for j in range(s0, pos + 1) if j < init_end or j >= local_start]
                    maxima.append(max(SCALE * float(q[bi, h, i] @ kk[j]) for j in keys))
                abar.append(sum(maxima) / len(maxima) if rows else math.inf)
                qbar.append(q[bi, h, rows].mean(0) if rows else torch.zeros(q.shape[-1]))
                lo_local = max(local_start, s0)
                init = set(range(s0, min(init_end, lo_local, last + 1)))
                blocks.append((init | set(range(lo_local, last + 1)), local_start))
            lists = []
            for r in range(n_r):
                g_rows = range((r // step) * step, min((r // step + 1) * step, n_r))
                local_start = blocks[r][1]
                stripes = {j for j in range(init_end, local_start)
                           if any(j < blocks[x][1] and SCALE * float(qbar[x] @ kk[j]) + theta[h] >= abar[x]
                                  for x in g_rows)}
                lists.append(sorted(blocks[r][0] | stripes))
            heads.append(lists)
        out.append(heads)
    return out


THETAS = (0.3, 1.0, 2.0, 1e30)


@pytest.mark.parametrize(("lq", "lk"), [(77, 77), (45, 77), (64, 64)], ids=["ragged", "chunked", "aligned"])
@pytest.mark.parametrize("padded", [False, True], ids=["plain", "left-padded"])
def test_matches_brute_force(lq, lk, padded):
    q, k, _ = _inputs(lq=lq, lk=lk)
    ks = torch.tensor([0, 21]) if padded else torch.zeros(2, dtype=torch.long)
    bounds = KeyBounds(key_start=ks) if padded else KeyBounds()
    sel = AnchorPrefill(block_size=BQ, step=STEP, theta=THETAS).select(q, k, _ctx(bounds))
    validate_tokens(sel)
    assert _lists(sel) == _brute(q, k, THETAS, ks)
    counts = sel.counts.float()
    assert counts[:, 0].sum() < counts[:, 2].sum()  # θ per head: a small θ keeps fewer keys


@pytest.mark.parametrize(("lq", "lk"), [(77, 77), (45, 77)], ids=["ragged", "chunked"])
@pytest.mark.parametrize("padded", [False, True], ids=["plain", "left-padded"])
def test_sliding_local_window_matches_brute_force(lq, lk, padded):
    """`local_window="sliding"`: every block sees the `local_blocks · big` keys up to its last query, and
    keeps only the big block's stripes before that window (no key listed twice)."""
    q, k, _ = _inputs(lq=lq, lk=lk)
    ks = torch.tensor([0, 21]) if padded else torch.zeros(2, dtype=torch.long)
    bounds = KeyBounds(key_start=ks) if padded else KeyBounds()
    sel = AnchorPrefill(block_size=BQ, step=STEP, theta=THETAS, local_window="sliding").select(q, k, _ctx(bounds))
    validate_tokens(sel)
    assert _lists(sel) == _brute(q, k, THETAS, ks, sliding=True)
    big_block = AnchorPrefill(block_size=BQ, step=STEP, theta=THETAS).select(q, k, _ctx(bounds))
    assert _lists(sel) != _lists(big_block)


def test_init_and_local_kept_padding_never_listed_and_padding_never_matters():
    q, k, _ = _inputs()
    ks = torch.tensor([0, 21])
    method = AnchorPrefill(block_size=BQ, step=STEP, theta=0.5)
    sel = method.select(q, k, _ctx(KeyBounds(key_start=ks)))
    for bi, heads in enumerate(_lists(sel)):
        for lists in heads:
            for r, keys in enumerate(lists):
                last = min((r + 1) * BQ, 77) - 1
                big_first = (r // STEP) * STEP * BQ
                assert all(j >= ks[bi] for j in keys)
                want = set(range(max(int(ks[bi]), big_first), last + 1))  # local window
                want |= set(range(int(ks[bi]), min(int(ks[bi]) + STEP * BQ, last + 1)))  # init window
                assert want <= set(keys)
    q2, k2 = q.clone(), k.clone()
    q2[1, :, :21] = 100.0  # padding rows and keys of row 1
    k2[1, :, :21] = -100.0
    sel2 = method.select(q2, k2, _ctx(KeyBounds(key_start=ks)))
    assert _lists(sel2) == _lists(sel)


def test_theta_is_monotone_and_extremes():
    q, k, _ = _inputs()
    lists = [_lists(AnchorPrefill(block_size=BQ, step=STEP, theta=t).select(q, k, _ctx())) for t in (0.5, 1.5)]
    for a, b in zip(sum(sum(lists[0], []), []), sum(sum(lists[1], []), []), strict=True):
        assert set(a) <= set(b)
    none = AnchorPrefill(block_size=BQ, step=STEP, theta=-1e30).select(q, k, _ctx())
    for r, keys in enumerate(_lists(none)[0][0]):  # θ = −∞: init + local windows only
        last, big_first = min((r + 1) * BQ, 77) - 1, (r // STEP) * STEP * BQ
        assert keys == sorted(set(range(0, min(STEP * BQ, last + 1))) | set(range(big_first, last + 1)))


def test_key_cap_keeps_the_largest_margins():
    q, k, _ = _inputs(lq=120, lk=120)
    forced = 2 * STEP * BQ
    capped = AnchorPrefill(block_size=BQ, step=STEP, theta=3.0, max_keys=forced + 3).select(q, k, _ctx())
    free = AnchorPrefill(block_size=BQ, step=STEP, theta=3.0).select(q, k, _ctx())
    validate_tokens(capped)
    assert int(capped.counts.max()) <= forced + 3 < int(free.counts.max())
    for a, b in zip(sum(sum(_lists(capped), []), []), sum(sum(_lists(free), []), []), strict=True):
        assert set(a) <= set(b)
    with pytest.raises(ValueError, match="max_keys"):
        AnchorPrefill(block_size=BQ, step=STEP, max_keys=forced - 1)


def test_window_and_key_validity_are_clipped():
    q, k, _ = _inputs()
    valid = torch.ones(2, 77, dtype=torch.bool)
    valid[1, 40:44] = False
    for bounds in (KeyBounds(window=20), KeyBounds(key_valid=valid), KeyBounds(key_start=torch.tensor([3, 9]),
                                                                             window=30)):
        sel = AnchorPrefill(block_size=BQ, step=STEP, theta=2.0).select(q, k, _ctx(bounds))
        validate_tokens(sel)
        visible = block_key_mask(bounds, 2, 77, 77, BQ, 0, num_blocks(77, BQ))  # [B|1, 1, R, Lk]
        listed = torch.zeros(2, 4, num_blocks(77, BQ), 78, dtype=torch.bool)
        idx = torch.where(torch.arange(sel.indices.shape[-1]) < sel.counts.unsqueeze(-1), sel.indices.long(), 77)
        listed.scatter_(-1, idx, True)
        assert not (listed[..., :77] & ~visible).any()


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("lq", [77, 45], ids=["prefill", "chunked"])
def test_full_density_equals_dense(padded, lq):
    q, k, v = _inputs(lq=lq)
    bounds = KeyBounds(key_start=torch.tensor([0, 21])) if padded else KeyBounds()
    method = AnchorPrefill(block_size=BQ, step=STEP, **AnchorPrefill.full_density)
    sel = method.select(q, k, _ctx(bounds))
    kept, total = sel.kept_and_total()
    out = token_gather_attention(q, k, v, sel, scale=SCALE, bounds=bounds)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bounds.dense_mask(2, lq, 77), scale=SCALE,
                                         enable_gqa=True)
    real = (torch.arange(lq) + 77 - lq >= (21 if padded else 0)).view(1, 1, lq)
    rows = real.expand(2, 4, lq).clone()
    rows[0] = True
    torch.testing.assert_close(out[rows], ref[rows], atol=1e-5, rtol=1e-5)
    if not padded:
        assert torch.equal(kept, total)


def test_short_inputs_fall_back_dense_and_options_are_checked():
    q, k, _ = _inputs(lq=32, lk=32)
    got = AnchorPrefill(block_size=BQ, step=STEP).select(q, k, _ctx())
    assert isinstance(got, DenseFallback) and "init and local windows" in got.reason
    assert isinstance(AnchorPrefill().select(*_inputs()[:2], _ctx()), DenseFallback)  # 2048-token big blocks
    info = get_method("anchor", "prefill")
    with pytest.raises(ValueError, match="block_size"):
        info.build({"block_size": 24})
    assert info.build({"theta": [1.0, 2.0, 3.0, 4.0]}, heads=4).theta == (1.0, 2.0, 3.0, 4.0)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_through_the_patch_on_tiny_models(family):
    """Sparse on every tiny family (the registry matrix runs the defaults, which fall back dense at
    300 tokens), equal to dense at full density."""
    from conftest import left_padded

    import attnpatch
    from attnpatch.testing import tiny_model

    model = tiny_model(family)
    ids, mask = left_padded(2, 200, [0, 23], seed=1)
    valid = mask.bool()
    opts = dict(block_size=16, step=2, theta=2.0)
    with torch.no_grad():
        dense = model(ids, attention_mask=mask).logits
        with attnpatch.patch_model(model, method="anchor", **opts) as patch:
            out = model(ids, attention_mask=mask).logits
            stats = patch.stats()
        with attnpatch.patch_model(model, method="anchor", **dict(opts, **AnchorPrefill.full_density)):
            exact = model(ids, attention_mask=mask).logits
    assert torch.isfinite(out[valid]).all() and stats.backends == {"prefill: reference": 2}
    assert 0 < stats.density < 1 and not stats.dense_fallbacks and stats.select_ms > 0
    torch.testing.assert_close(exact[valid], dense[valid], atol=2e-5, rtol=1e-4)
