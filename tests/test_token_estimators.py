"""Shared token scorers (estimators/pooled.py, anchor.py, token_mass.py) against brute-force
definitions, and chunking that does not change any result."""

import pytest
import torch

import attnpatch.estimators.anchor as anchor_est
import attnpatch.estimators.pooled as pooled_est
import attnpatch.methods.prefill.anchor as anchor_method
import attnpatch.methods.prefill.s2o as s2o_method
from attnpatch.estimators import anchor as anchor_estimator
from attnpatch.estimators.anchor import pooled_anchors
from attnpatch.estimators.pooled import pool_queries, pooled_scores
from attnpatch.estimators.token_mass import block_token_mass
from attnpatch.methods.base import PrefillContext
from attnpatch.sparsity import KeyBounds


def _qk(b=2, hq=4, hkv=2, lq=45, lk=60, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, hq, lq, d, generator=g), torch.randn(b, hkv, lk, d, generator=g)


def test_pool_queries_means_the_valid_rows():
    q, _ = _qk()
    valid = torch.rand(2, 45, generator=torch.Generator().manual_seed(1)) < 0.6
    valid[1, 32:] = False  # a sub-block with no valid row
    got, rows = pool_queries(q, 16, valid)
    for b in range(2):
        for i in range(3):
            m = valid[b, i * 16:(i + 1) * 16]
            want = q[b, :, i * 16:(i + 1) * 16][:, m].mean(1) if m.any() else torch.zeros(4, 8)
            torch.testing.assert_close(got[b, :, i], want)
            assert rows[b, 0, i] == m.sum()


def test_pooled_scores_read_the_kv_head_of_each_query_head():
    q, k = _qk()
    qbar = q[:, :, :5]
    got = pooled_scores(qbar, k, 0.3, keys=40)
    want = 0.3 * qbar @ k.repeat_interleave(2, 1)[:, :, :40].transpose(-1, -2)
    torch.testing.assert_close(got, want)


def test_pooled_anchors_are_row_maxima_over_init_and_local_windows():
    q, k = _qk()
    bq, off = 8, 15
    ks = torch.tensor([0, 20])
    local_lo = torch.tensor([[0, 0, 16, 16, 32, 32], [20, 20, 20, 20, 32, 32]]) + off
    local_lo = torch.maximum(local_lo, ks.view(-1, 1))
    abar, qbar, rows = pooled_anchors(q, k, 0.5, bq, ks, 10, local_lo, 24, KeyBounds(key_start=ks),
                                      torch.arange(45).view(1, -1) + off >= ks.view(-1, 1))
    scores = 0.5 * q @ k.repeat_interleave(2, 1).transpose(-1, -2)  # [B, H, Lq, Lk]
    for b in range(2):
        for r in range(6):
            live = [i for i in range(r * bq, min((r + 1) * bq, 45)) if i + off >= ks[b]]
            maxima = []
            for i in live:
                keys = [j for j in range(int(ks[b]), i + off + 1) if j < ks[b] + 10 or j >= local_lo[b, r]]
                maxima.append(scores[b, :, i, keys].amax(-1))
            want = torch.stack(maxima).mean(0) if live else torch.full((4,), float("inf"))
            torch.testing.assert_close(abar[b, :, r], want)
            assert rows[b, 0, r] == len(live)


@pytest.mark.parametrize("chunk", [1, 1 << 12, 1 << 30])
@pytest.mark.parametrize("seed", [0, 1])
def test_pooled_anchors_match_the_definition_for_any_chunking(chunk, seed, monkeypatch):
    """Local windows scored from one contiguous slice of K per chunk (init keys gathered once) give the
    same anchors as the per-row definition, whatever the chunking."""
    monkeypatch.setattr(anchor_estimator, "_CHUNK_ELEMS", chunk)
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, 4, 45, 8, generator=g), torch.randn(2, 2, 60, 8, generator=g)
    bq, off, big = 4, 15, 12
    ks = torch.tensor([0, 7])
    r = torch.arange(12)
    local_lo = torch.maximum((off + (r // 3) * big - big).clamp(min=0).view(1, -1), ks.view(-1, 1))
    abar, _, _ = pooled_anchors(q, k, 0.5, bq, ks, 10, local_lo, 2 * big, KeyBounds(key_start=ks),
                                torch.arange(45).view(1, -1) + off >= ks.view(-1, 1))
    scores = 0.5 * q @ k.repeat_interleave(2, 1).transpose(-1, -2)
    for b in range(2):
        for rr in range(12):
            live = [i for i in range(rr * bq, min((rr + 1) * bq, 45)) if i + off >= ks[b]]
            maxima = [scores[b, :, i, [j for j in range(int(ks[b]), i + off + 1)
                                       if j < ks[b] + 10 or j >= local_lo[b, rr]]].amax(-1) for i in live]
            want = torch.stack(maxima).mean(0) if live else torch.full((4,), float("inf"))
            torch.testing.assert_close(abar[b, :, rr], want)


def test_block_token_mass_is_the_mean_of_sub_block_softmaxes():
    q, k = _qk(lq=32, lk=50)
    qbar, rows = pool_queries(q, 4)
    sub_last = 18 + (torch.arange(8) + 1) * 4 - 1
    bounds = KeyBounds(key_start=torch.tensor([0, 5]))
    got = block_token_mass(qbar, rows, k, 0.5, sub_last, 2, bounds, keys=50)  # 4 blocks of 2 sub-blocks
    s = 0.5 * qbar @ k.repeat_interleave(2, 1).transpose(-1, -2)
    for b, start in enumerate((0, 5)):
        vis = (torch.arange(50) <= sub_last.view(-1, 1)) & (torch.arange(50) >= start)
        p = torch.softmax(s[b].masked_fill(~vis, float("-inf")), -1)  # [H, 8, 50]
        torch.testing.assert_close(got[b], p.view(4, 4, 2, 50).mean(2))
        torch.testing.assert_close(got[b].sum(-1), torch.ones(4, 4))


@pytest.mark.parametrize("name", ["anchor", "s2o"])
def test_chunking_does_not_change_the_selection(name, monkeypatch):
    q, k = _qk(lq=70, lk=90, d=16)
    bounds = KeyBounds(key_start=torch.tensor([0, 11]))
    ctx = PrefillContext(0, 0.25, bounds, None)
    method = (anchor_method.AnchorPrefill(block_size=8, step=2, theta=1.5) if name == "anchor"
              else s2o_method.S2OPrefill(block_size=8, pool_size=4, tau=0.1))
    whole = method.select(q, k, ctx)
    for module in (anchor_est, pooled_est, anchor_method, s2o_method):
        monkeypatch.setattr(module, "_CHUNK_ELEMS", 1)
    sliced = method.select(q, k, ctx)
    keep = torch.arange(whole.indices.shape[-1]) < whole.counts.unsqueeze(-1)
    assert torch.equal(sliced.counts, whole.counts)
    assert torch.equal(torch.where(keep, sliced.indices[..., :keep.shape[-1]], 0), torch.where(keep, whole.indices, 0))
