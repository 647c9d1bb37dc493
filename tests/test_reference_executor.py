"""The PyTorch block-sparse executor against dense attention with an explicit token mask."""

import math

import pytest
import torch

from attnpatch.backends.reference import block_sparse_attention, merge_partials
from attnpatch.sparsity import BlockSelection, causal_block_limit, num_blocks


def dense_masked(q, k, v, token_mask, scale=None):
    """Plain softmax attention; token_mask [B, H, Lq, Lk] True = attend. Fully masked rows give 0."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    scale = scale or 1 / math.sqrt(q.shape[-1])
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    s = s.masked_fill(~token_mask, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    lse = torch.logsumexp(s, -1)
    return (p @ v.double()).to(q.dtype), lse.float()


def token_mask_of(sel: BlockSelection, lq: int, lk: int) -> torch.Tensor:
    """Token-level mask implied by a block selection + the causal rule (built naively for the test)."""
    blocks = sel.to_block_mask()  # [B, H, R, C]
    qb = torch.arange(lq) // sel.block_q
    kb = torch.arange(lk) // sel.block_k
    m = blocks[:, :, qb][:, :, :, kb]
    causal = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
    return m & causal


def random_selection(b, h, lq, lk, bq, bk, p=0.4, seed=0, shared=False):
    g = torch.Generator().manual_seed(seed)
    r, c = num_blocks(lq, bq), num_blocks(lk, bk)
    limit = causal_block_limit(lq, lk, bq, bk)
    hh = 1 if shared else h
    keep = torch.rand(b, hh, r, c, generator=g) < p
    col = torch.arange(c)
    keep |= col == 0  # sink
    keep |= col == (limit - 1).view(1, 1, r, 1)  # diagonal
    keep &= col < limit.view(1, 1, r, 1)
    sel = BlockSelection.from_block_mask(keep, bq, bk, lq, lk)
    if shared:
        sel = BlockSelection(sel.indices.expand(b, h, -1, -1), sel.counts.expand(b, h, -1), bq, bk, lq, lk)
    return sel


@pytest.mark.parametrize("lq,lk", [(70, 70), (33, 90), (64, 64), (1, 40)])
@pytest.mark.parametrize("shared", [False, True])
def test_random_selection_matches_masked_dense(lq, lk, shared):
    torch.manual_seed(lq + lk)
    q, k, v = torch.randn(2, 4, lq, 16), torch.randn(2, 2, lk, 16), torch.randn(2, 2, lk, 16)
    sel = random_selection(2, 4, lq, lk, 16, 16, seed=lq, shared=shared)
    sel.validate()
    out, lse = block_sparse_attention(q, k, v, sel, return_lse=True)
    ref, ref_lse = dense_masked(q, k, v, token_mask_of(sel, lq, lk))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


def test_full_selection_equals_sdpa_causal():
    q, k, v = torch.randn(1, 6, 100, 32), torch.randn(1, 3, 100, 32), torch.randn(1, 3, 100, 32)
    limit = causal_block_limit(100, 100, 32, 16)
    full = (torch.arange(num_blocks(100, 16)) < limit[:, None]).expand(1, 6, -1, -1)
    sel = BlockSelection.from_block_mask(full, 32, 16, 100, 100)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(block_sparse_attention(q, k, v, sel), ref, atol=1e-5, rtol=1e-5)


def test_padding_mask_and_diagonal_only_rows():
    lq = lk = 48
    q, k, v = torch.randn(2, 2, lq, 8), torch.randn(2, 1, lk, 8), torch.randn(2, 1, lk, 8)
    limit = causal_block_limit(lq, lk, 16, 16)
    diag = torch.arange(3)[None, :] == (limit - 1)[:, None]  # only the diagonal block
    sel = BlockSelection.from_block_mask(diag.expand(2, 2, -1, -1), 16, 16, lq, lk)
    pad = torch.ones(2, lk, dtype=torch.bool)
    pad[1, :20] = False
    mask4d = pad[:, None, None, :] & torch.ones(lq, lk, dtype=torch.bool).tril()
    out = block_sparse_attention(q, k, v, sel, mask=mask4d)
    ref, _ = dense_masked(q, k, v, token_mask_of(sel, lq, lk) & mask4d)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.all(out[1, :, :16] == 0)  # padded query rows that see no key give 0


def test_merge_of_disjoint_partials_equals_union():
    lq = lk = 64
    q, k, v = torch.randn(1, 2, lq, 16), torch.randn(1, 2, lk, 16), torch.randn(1, 2, lk, 16)
    sel = random_selection(1, 2, lq, lk, 16, 16, p=0.6, seed=5)
    blocks = sel.to_block_mask()
    first = blocks & (torch.arange(blocks.shape[-1]) < 2)
    second = blocks & ~first
    parts = [block_sparse_attention(q, k, v, BlockSelection.from_block_mask(m, 16, 16, lq, lk), return_lse=True)
             for m in (first, second)]
    out, lse = merge_partials(*parts[0], *parts[1])
    ref, ref_lse = block_sparse_attention(q, k, v, sel, return_lse=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


def test_memory_stays_linear_in_kept_blocks():
    """A 16K-token banded selection runs in bounded chunks (an L×L float32 tensor would be 1 GiB)."""
    lq = lk = 16384
    q, k, v = torch.randn(1, 1, lq, 16), torch.randn(1, 1, lk, 16), torch.randn(1, 1, lk, 16)
    r = num_blocks(lq, 128)
    col = torch.arange(r)
    band = ((col[None, :] <= col[:, None]) & (col[None, :] >= col[:, None] - 1)) | (col[None, :] == 0)
    sel = BlockSelection.from_block_mask(band.view(1, 1, r, r), 128, 128, lq, lk)
    out = block_sparse_attention(q, k, v, sel)
    assert out.shape == (1, 1, lq, 16) and torch.isfinite(out).all()


def test_selection_roundtrip_and_validation():
    sel = random_selection(1, 2, 64, 64, 16, 16, seed=9)
    again = BlockSelection.from_block_mask(sel.to_block_mask(), 16, 16, 64, 64)
    assert torch.equal(again.to_block_mask(), sel.to_block_mask())
    bad = BlockSelection(torch.tensor([[[[1, 0]]]], dtype=torch.int32), torch.tensor([[[2]]], dtype=torch.int32),
                         64, 64, 64, 128)
    with pytest.raises(ValueError, match="ascending"):
        bad.validate()
    beyond = BlockSelection(torch.tensor([[[[0, 5]]]], dtype=torch.int32), torch.tensor([[[2]]], dtype=torch.int32),
                            64, 64, 64, 128)
    with pytest.raises(ValueError, match="causal limit"):
        beyond.validate()


@pytest.mark.parametrize("chunk_bytes", [None, 1], ids=["one-chunk", "chunk-per-query-block"])
def test_token_gather_matches_masked_dense(chunk_bytes, monkeypatch):
    from attnpatch.backends.reference import executors, token_gather_attention

    if chunk_bytes is not None:
        monkeypatch.setattr(executors, "_CHUNK_BYTES", chunk_bytes)
    from attnpatch.sparsity import TokenSelection

    lq, lk, bq = 40, 70, 16
    q, k, v = torch.randn(1, 4, lq, 8), torch.randn(1, 2, lk, 8), torch.randn(1, 2, lk, 8)
    g = torch.Generator().manual_seed(0)
    r = num_blocks(lq, bq)
    keep = torch.rand(1, 4, r, lk, generator=g) < 0.3
    keep[..., 0] = True
    counts = keep.sum(-1, dtype=torch.int32)
    order = torch.where(keep, torch.arange(lk), lk + torch.arange(lk)).argsort(-1)[..., : int(counts.max())]
    sel = TokenSelection(order.to(torch.int32), counts, bq, lq, lk)
    out, lse = token_gather_attention(q, k, v, sel, return_lse=True)
    tok = keep[:, :, torch.arange(lq) // bq]  # [1,4,lq,lk]
    tok &= torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
    ref, ref_lse = dense_masked(q, k, v, tok)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


def test_paged_decode_matches_masked_dense():
    from attnpatch.backends.reference import paged_decode_attention
    from attnpatch.sparsity import PageSelection

    lk, ps = 75, 16
    q, k, v = torch.randn(2, 4, 1, 8), torch.randn(2, 2, lk, 8), torch.randn(2, 2, lk, 8)
    pages = torch.tensor([[[0, 2, 4], [1, 4, 0]], [[3, 0, 0], [0, 1, 2]]], dtype=torch.int32)
    counts = torch.tensor([[3, 2], [1, 3]], dtype=torch.int32)
    out, lse = paged_decode_attention(q, k, v, PageSelection(pages, counts, ps, lk), return_lse=True)
    tok = torch.zeros(2, 2, lk, dtype=torch.bool)
    for b in range(2):
        for h in range(2):
            for p in pages[b, h, : counts[b, h]].tolist():
                tok[b, h, p * ps : min((p + 1) * ps, lk)] = True
    ref, ref_lse = dense_masked(q, k, v, tok.repeat_interleave(2, 1)[:, :, None, :])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    full = PageSelection.all_pages(2, 2, lk, ps)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    torch.testing.assert_close(paged_decode_attention(q, k, v, full), dense, atol=1e-5, rtol=1e-5)
