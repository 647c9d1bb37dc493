"""BLASST: the skip rule against a plain sequential online-softmax loop, and end to end through patch_model."""

import math

import pytest
import torch
from conftest import left_padded, random_ids

import attnpatch
from attnpatch.backends.reference import block_sparse_attention, paged_decode_attention
from attnpatch.sparsity import BlockSelection, PageSelection, SkipRule, num_blocks


def sequential_skip_attention(q, k, v, bq, bk, log_thr, scale):
    """Flash-style loop per (batch, query head, query block), tiles left to right, BLASST's skip test."""
    b, hq, lq, d = q.shape
    g, lk = hq // k.shape[1], k.shape[2]
    off = lk - lq
    out = torch.zeros(b, hq, lq, v.shape[-1], dtype=torch.float64)
    visited = skipped = 0
    for bi in range(b):
        for h in range(hq):
            for r in range(num_blocks(lq, bq)):
                rows = torch.arange(r * bq, min((r + 1) * bq, lq))
                qr = q[bi, h, rows].double()
                m = torch.full((len(rows),), -math.inf, dtype=torch.float64)
                denom = torch.zeros(len(rows), dtype=torch.float64)
                acc = torch.zeros(len(rows), v.shape[-1], dtype=torch.float64)
                last = off + rows[-1].item()
                for c in range(last // bk + 1):
                    cols = torch.arange(c * bk, min((c + 1) * bk, lk))
                    s = (qr @ k[bi, h // g, cols].double().T) * scale
                    s = s.masked_fill(cols[None, :] > (rows[:, None] + off), -math.inf)
                    tmax = s.max(-1).values
                    visited += 1
                    negligible = (tmax == -math.inf) | (tmax - m < log_thr)
                    if bool(negligible.all()):
                        skipped += 1
                        continue
                    m_new = torch.maximum(m, tmax)
                    p = torch.exp(s - m_new[:, None])
                    corr = torch.exp(m - m_new)
                    denom = denom * corr + p.sum(-1)
                    acc = acc * corr[:, None] + p @ v[bi, h // g, cols].double()
                    m = m_new
                out[bi, h, rows] = acc / denom[:, None]
    return out, visited, skipped


def sink_heavy_qkv(b, hq, hkv, lq, lk, d, seed=0):
    """Random Q/K/V where every query is drawn to key 0 (an attention sink), so tiles get skipped."""
    g = torch.Generator().manual_seed(seed)
    u = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    q = torch.randn(b, hq, lq, d, generator=g) * 0.5 + 2 * u
    k = torch.randn(b, hkv, lk, d, generator=g) * 0.5
    k[:, :, 0] = 12 * u
    v = torch.randn(b, hkv, lk, d, generator=g)
    return q, k, v


@pytest.mark.parametrize("lq,lk,log_thr", [(96, 96, -3.0), (40, 100, -2.0), (96, 96, -50.0)])
def test_reference_skip_matches_sequential_loop(lq, lk, log_thr):
    q, k, v = sink_heavy_qkv(1, 4, 2, lq, lk, 16)
    scale = 0.25
    sel = BlockSelection.causal(1, 4, lq, lk, 16, 16, skip=SkipRule(log_thr))
    counts = torch.zeros(2, dtype=torch.int64)
    out = block_sparse_attention(q, k, v, sel, scale=scale, tile_counts=counts)
    ref, visited, skipped = sequential_skip_attention(q, k, v, 16, 16, log_thr, scale)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    assert counts.tolist() == [visited, skipped]
    if log_thr > -10:
        assert skipped > 0
    else:
        assert skipped == 0


def test_per_head_thresholds():
    q, k, v = sink_heavy_qkv(1, 4, 2, 64, 64, 16, seed=1)
    thr = torch.tensor([-50.0, -2.0, -50.0, -2.0])
    sel = BlockSelection.causal(1, 4, 64, 64, 16, 16, skip=SkipRule(thr))
    out = block_sparse_attention(q, k, v, sel, scale=0.25)
    for h in range(4):
        ref, _, _ = sequential_skip_attention(q[:, h : h + 1], k[:, h // 2 : h // 2 + 1], v[:, h // 2 : h // 2 + 1],
                                              16, 16, float(thr[h]), 0.25)
        torch.testing.assert_close(out[:, h : h + 1].double(), ref, atol=1e-5, rtol=1e-5)


def test_decode_skip_is_joint_over_the_group():
    q, k, v = sink_heavy_qkv(2, 4, 2, 1, 90, 16, seed=2)
    sel = PageSelection.all_pages(2, 2, 90, 16, skip=SkipRule(-2.0))
    counts = torch.zeros(2, dtype=torch.int64)
    out = paged_decode_attention(q, k, v, sel, scale=0.25, tile_counts=counts)
    visited = skipped = 0
    expected = torch.zeros_like(out, dtype=torch.float64)
    for b in range(2):
        for kvh in range(2):
            rows = q[b, 2 * kvh : 2 * kvh + 2, 0].double()
            s = (rows @ k[b, kvh].double().T) * 0.25  # [G, L]
            keep = torch.zeros(90, dtype=torch.bool)
            m = torch.full((2,), -math.inf, dtype=torch.float64)
            for p in range(num_blocks(90, 16)):
                cols = slice(p * 16, min((p + 1) * 16, 90))
                tmax = s[:, cols].max(-1).values
                visited += 1
                if bool((tmax - m < -2.0).all()):
                    skipped += 1
                    continue
                keep[cols] = True
                m = torch.maximum(m, tmax)
            w = torch.softmax(s.masked_fill(~keep, -math.inf), -1)
            expected[b, 2 * kvh : 2 * kvh + 2, 0] = w @ v[b, kvh].double()
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    assert counts.tolist() == [visited, skipped] and skipped > 0


@torch.no_grad()
def test_blasst_through_patch_model(tiny):
    ids, mask = left_padded(2, 100, [0, 9], seed=5)
    dense = tiny(ids, attention_mask=mask).logits
    valid = mask.bool()
    with attnpatch.patch_model(tiny, method="blasst", a=1e-12, block_size=16) as patch:
        exactish = tiny(ids, attention_mask=mask).logits
        assert patch.stats().skipped_fraction == 0.0
    torch.testing.assert_close(exactish[valid], dense[valid], atol=1e-5, rtol=1e-4)
    with attnpatch.patch_model(tiny, method="blasst", decode="blasst", prefill_options={"a": 1e4},
                               decode_options={"a": 1e4}, block_size=16, page_size=16) as patch:
        tiny(ids, attention_mask=mask)
        stats = patch.stats()
        assert stats.skipped_fraction > 0
        assert all(d["skipped_fraction"] is not None for d in stats.layers)
        out = tiny.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
        layers = patch.stats().layers
    assert out.shape[1] == 104
    assert all(d["decode_skipped_fraction"] is not None for d in layers)


@torch.no_grad()
def test_blasst_fallbacks_and_conventions(llama):
    with attnpatch.patch_model(llama, method="blasst", a=0.0, block_size=16) as patch:
        llama(random_ids(1, 64))
        assert "a = 0" in next(iter(patch.stats().dense_fallbacks))
    with attnpatch.patch_model(llama, method="blasst", block_size=128) as patch:
        llama(random_ids(1, 64))
        assert "fits in one 128-key tile" in next(iter(patch.stats().dense_fallbacks))
    fractions = {}
    for conv in ("scaled", "raw"):
        with attnpatch.patch_model(llama, method="blasst", a=20.0, block_size=16, convention=conv) as patch:
            llama(random_ids(1, 128))
            fractions[conv] = patch.stats().skipped_fraction
    # raw thresholds are σ·ln λ in scaled units (σ = 1/4 here): a looser bound, so more tiles are skipped
    assert fractions["raw"] >= fractions["scaled"]
    with pytest.raises(ValueError, match="convention.*'scaled', 'raw'"):
        attnpatch.patch_model(llama, method="blasst", convention="log")


@pytest.mark.parametrize("lq,lk", [(96, 96), (40, 100)])
def test_reference_executor_agrees_with_the_kernels_tiled_oracle(lq, lk):
    """The patch's reference path and the Triton kernel's PyTorch twin apply the same skip rule."""
    from attnpatch.backends.reference import block_sparse_attention_tiled_reference

    q, k, v = sink_heavy_qkv(1, 4, 2, lq, lk, 16, seed=7)
    sel = BlockSelection.causal(1, 4, lq, lk, 16, 16)
    counts = torch.zeros(2, dtype=torch.int64)
    ours = block_sparse_attention(q, k, v, BlockSelection.causal(1, 4, lq, lk, 16, 16, skip=SkipRule(math.log(0.05))),
                                  scale=0.25, tile_counts=counts)
    twin, (visited, skipped) = block_sparse_attention_tiled_reference(q, k, v, sel, scale=0.25,
                                                                      skip_bound=math.log(0.05), count_tiles=True)
    torch.testing.assert_close(ours, twin, atol=1e-5, rtol=1e-5)
    assert counts.tolist() == [int(visited), int(skipped)] and int(skipped) > 0
