"""Shared scorers (attnpatch/estimators) against brute-force definitions that build the whole L×L
attention (fine at test sizes): last-query attention and its column / diagonal sums, antidiagonal
block mass, pooled block attention, and the vertical / slash → block conversions."""

import pytest
import torch

from attnpatch.estimators.antidiagonal import antidiagonal_block_scores
from attnpatch.estimators.keys import first_real_key, real_keys
from attnpatch.estimators.last_queries import column_sums, diagonal_sums, last_query_attention
from attnpatch.estimators.pooled import pool_blocks, pooled_block_attention
from attnpatch.estimators.vertical_slash import (
    block_diagonals,
    block_sums,
    column_blocks,
    diagonal_blocks,
    top_per_head,
)
from attnpatch.sparsity import KeyBounds, num_blocks
from attnpatch.sparsity.regions import allowed_blocks

B, HQ, HKV, D = 2, 4, 2, 8
BOUNDS = {
    "plain": KeyBounds(),
    "left-padded": KeyBounds(key_start=torch.tensor([0, 13])),
    "key-valid": KeyBounds(key_valid=torch.arange(70).view(1, -1).expand(2, -1) % 9 != 4),
    "window": KeyBounds(key_start=torch.tensor([3, 0]), window=21),
}


def _inputs(lq, lk, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, HQ, lq, D, generator=g), torch.randn(B, HKV, lk, D, generator=g)


def _full_probs(q, k, scale, bounds):
    """[B, Hq, Lq, Lk] exact softmax attention with K repeated (rows that see nothing: 0)."""
    lq, lk = q.shape[2], k.shape[2]
    s = q @ k.repeat_interleave(HQ // HKV, 1).transpose(-1, -2) * scale
    s = s.masked_fill(~bounds.dense_mask(B, lq, lk), float("-inf"))
    return torch.softmax(s, -1).nan_to_num(0.0)


@pytest.mark.parametrize("name", list(BOUNDS))
@pytest.mark.parametrize("lq", [70, 29], ids=["prefill", "chunked"])
def test_last_query_attention_columns_and_diagonals(name, lq):
    bounds = BOUNDS[name]
    q, k = _inputs(lq, 70)
    probs = last_query_attention(q, k, 0.3, bounds, 16)
    full = _full_probs(q, k, 0.3, bounds)[:, :, -16:]
    torch.testing.assert_close(probs, full)
    torch.testing.assert_close(column_sums(probs), full.sum(-2))
    diag = torch.zeros(B, HQ, 70)
    for i in range(16):
        p = 70 - 16 + i
        for o in range(p + 1):
            diag[:, :, o] += full[:, :, i, p - o]
    torch.testing.assert_close(diagonal_sums(probs), diag)
    assert last_query_attention(q, k, 0.3, bounds, 1000).shape[2] == lq  # n capped at Lq


def test_padding_keys_never_influence_last_query_scores():
    q, k = _inputs(40, 40)
    bounds = KeyBounds(key_start=torch.tensor([0, 11]))
    k2 = k.clone()
    k2[1, :, :11] = 1e3 * torch.randn(HKV, 11, D)
    a, b2 = (last_query_attention(q, kk, 0.3, bounds, 8) for kk in (k, k2))
    torch.testing.assert_close(a, b2)
    assert (a[1, ..., :11] == 0).all()


def _antidiagonal_reference(q, k, scale, bounds, bs, stride):
    """XAttention's antidiagonal mass, one (query group, key group) at a time."""
    lq, lk = q.shape[2], k.shape[2]
    off = lk - lq
    real = real_keys(bounds, B, lk, "cpu")
    real = torch.ones(B, lk, dtype=torch.bool) if real is None else real
    kk = (k * real.view(B, 1, lk, 1)).repeat_interleave(HQ // HKV, 1)
    raw = q @ kk.transpose(-1, -2)  # [B, Hq, Lq, Lk]
    ng_q, ng_k = num_blocks(lq, bs) * bs // stride, num_blocks(lk, bs) * bs // stride
    s = torch.full((B, HQ, ng_q, ng_k), float("-inf"))
    for g in range(ng_q):
        first, last = g * stride, min(g * stride + stride, lq) - 1
        if first >= lq:
            continue
        for gk in range(ng_k):
            if gk * stride > off + last:
                continue
            tot = torch.zeros(B, HQ)
            for t in range(stride):
                i, j = g * stride + stride - 1 - t, gk * stride + t
                if i < lq and j < lk:
                    tot += raw[:, :, i, j]
            for b in range(B):
                keys_real = real[b, gk * stride:min(gk * stride + stride, lk)].any()
                queries_real = real[b, off + first:off + last + 1].any()
                in_window = bounds.window is None or gk * stride + stride - 1 > off + first - bounds.window
                if keys_real and queries_real and in_window:
                    s[b, :, g, gk] = tot[b] * scale / stride
    p = torch.softmax(s, -1).nan_to_num(0.0)
    per = bs // stride
    return p.view(B, HQ, ng_q // per, per, ng_k // per, per).sum(dim=(3, 5))


@pytest.mark.parametrize("name", list(BOUNDS))
@pytest.mark.parametrize("lq", [70, 29], ids=["prefill", "chunked"])
@pytest.mark.parametrize("stride", [2, 4])
def test_antidiagonal_scores_match_definition(name, lq, stride):
    bounds = BOUNDS[name]
    q, k = _inputs(lq, 70, seed=1)
    got = antidiagonal_block_scores(q, k, 0.3, bounds, 8, stride)
    torch.testing.assert_close(got, _antidiagonal_reference(q, k, 0.3, bounds, 8, stride))
    chunked = antidiagonal_block_scores(q, k, 0.3, bounds, 8, stride, chunk_elems=1)  # one query block per chunk
    torch.testing.assert_close(chunked, got)


def test_antidiagonal_rows_sum_to_their_real_query_groups_and_padding_is_inert():
    q, k = _inputs(64, 64, seed=2)
    bounds = KeyBounds(key_start=torch.tensor([0, 20]))
    s = antidiagonal_block_scores(q, k, 0.3, bounds, 16, 4)
    real_groups = torch.tensor([[4.0] * 4, [0.0, 3.0, 4.0, 4.0]])  # groups of 4 holding a real query
    torch.testing.assert_close(s.sum(-1), real_groups.view(2, 1, 4).expand(2, HQ, 4))
    k2 = k.clone()
    k2[1, :, :20] = 50 * torch.randn(HKV, 20, D)
    torch.testing.assert_close(antidiagonal_block_scores(q, k2, 0.3, bounds, 16, 4), s)
    with pytest.raises(ValueError, match="multiple of the stride"):
        antidiagonal_block_scores(q, k, 0.3, bounds, 16, 3)


@pytest.mark.parametrize("name", list(BOUNDS))
@pytest.mark.parametrize("lq", [70, 29], ids=["prefill", "chunked"])
def test_pooled_block_attention_matches_definition(name, lq):
    bounds = BOUNDS[name]
    q, k = _inputs(lq, 70, seed=3)
    bs = 8
    got = pooled_block_attention(q, k, 0.3, bounds, bs)
    real = real_keys(bounds, B, 70, "cpu")
    real = torch.ones(B, 70, dtype=torch.bool) if real is None else real
    r, c = num_blocks(lq, bs), num_blocks(70, bs)
    pq, pk = torch.zeros(B, HQ, r, D), torch.zeros(B, HKV, c, D)
    for b in range(B):
        for i in range(r):
            rows = [t for t in range(i * bs, min(i * bs + bs, lq)) if real[b, 70 - lq + t]]
            if rows:
                pq[b, :, i] = q[b, :, rows].mean(1)
        for j in range(c):
            cols = [t for t in range(j * bs, min(j * bs + bs, 70)) if real[b, t]]
            if cols:
                pk[b, :, j] = k[b, :, cols].mean(1)
    s = pq @ pk.repeat_interleave(HQ // HKV, 1).transpose(-1, -2) * 0.3
    s = s.masked_fill(~allowed_blocks(B, lq, 70, bs, bs, bounds), float("-inf"))
    torch.testing.assert_close(got, torch.softmax(s, -1).nan_to_num(0.0))
    torch.testing.assert_close(pool_blocks(k, bs, real), pk)


def test_real_keys_and_first_real_key():
    bounds = KeyBounds(key_start=torch.tensor([0, 5]))
    assert real_keys(KeyBounds(), 2, 9, "cpu") is None
    assert real_keys(bounds, 2, 9, "cpu").sum(-1).tolist() == [9, 4]
    assert first_real_key(bounds, 2, 9, "cpu").tolist() == [0, 5]
    mask = bounds.dense_mask(2, 9, 9)
    assert torch.equal(real_keys(KeyBounds(mask=mask), 2, 9, "cpu"), real_keys(bounds, 2, 9, "cpu"))


@pytest.mark.parametrize("lq,lk", [(70, 70), (29, 70), (33, 100)])
def test_diagonal_blocks_hold_exactly_the_selected_diagonals(lq, lk):
    g = torch.Generator().manual_seed(4)
    diagonals = torch.rand(B, HQ, lk, generator=g) < 0.05
    bs = 8
    got = diagonal_blocks(diagonals, lq, bs, chunk_elems=7)  # several query-block chunks
    qpos = torch.arange(lq).view(-1, 1) + lk - lq
    offset = qpos - torch.arange(lk).view(1, -1)  # [Lq, Lk]
    on = (offset >= 0) & diagonals[..., offset.clamp(0, lk - 1)]  # [B, H, Lq, Lk] token pattern
    r, c = num_blocks(lq, bs), num_blocks(lk, bs)
    padded = torch.nn.functional.pad(on, (0, c * bs - lk, 0, r * bs - lq))
    want = padded.view(B, HQ, r, bs, c, bs).any(dim=(3, 5))
    assert torch.equal(got, want)


def test_column_and_block_diagonal_conversions():
    cols = torch.zeros(1, 1, 20, dtype=torch.bool)
    cols[0, 0, [3, 17]] = True
    assert column_blocks(cols, 8).tolist() == [[[True, False, True]]]
    sel = torch.tensor([[[True, False, True]]])  # block-diagonals 0 and 2
    got = block_diagonals(sel, 20, 20, 8)[0, 0]
    assert got.tolist() == [[True, False, False], [False, True, False], [True, False, True]]
    chunked = block_diagonals(sel, 12, 20, 8)[0, 0]  # query blocks end at positions 15 and 19: diagonal 1 and 2
    assert chunked.tolist() == [[False, True, False], [True, False, True]]
    assert block_sums(torch.arange(10.0).view(1, 1, 10), 4).tolist() == [[[6.0, 22.0, 17.0]]]


def test_top_per_head_takes_a_budget_per_head():
    scores = torch.tensor([[[0.1, 0.5, 0.3, 0.2], [0.4, 0.1, 0.2, 0.3]]])
    got = top_per_head(scores, torch.tensor([1, 3]))
    assert got.tolist() == [[[False, True, False, False], [True, False, True, True]]]


def test_scorers_take_transposed_layouts_and_half_precision():
    """Keys straight from a projection are `[B, L, H, D]` transposed (no cache); bf16 sums accumulate in float32."""
    q, k = _inputs(70, 70, seed=5)
    qt, kt = q.transpose(1, 2).contiguous().transpose(1, 2), k.transpose(1, 2).contiguous().transpose(1, 2)
    bounds = BOUNDS["left-padded"]
    torch.testing.assert_close(antidiagonal_block_scores(qt, kt, 0.3, bounds, 8, 4),
                               antidiagonal_block_scores(q, k, 0.3, bounds, 8, 4))
    torch.testing.assert_close(pooled_block_attention(qt, kt, 0.3, bounds, 8),
                               pooled_block_attention(q, k, 0.3, bounds, 8))
    torch.testing.assert_close(last_query_attention(qt, kt, 0.3, bounds, 8), last_query_attention(q, k, 0.3, bounds, 8))
    half = antidiagonal_block_scores(q.bfloat16(), k.bfloat16(), 0.3, bounds, 8, 4)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, antidiagonal_block_scores(q, k, 0.3, bounds, 8, 4), atol=0.05, rtol=0.05)
    torch.testing.assert_close(pool_blocks(k.bfloat16(), 8), pool_blocks(k, 8), atol=0.02, rtol=0.02)
