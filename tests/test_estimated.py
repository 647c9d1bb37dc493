"""The estimate → select base: a method written as one `estimate` gets selectors, forced regions and
clipping (causal, sliding window, padding) from the base, per head or per KV group."""

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from method_cases import calibration_options, random_qkv

from attnpatch.backends.reference import block_sparse_attention
from attnpatch.methods.base import DenseFallback, PrefillContext
from attnpatch.methods.estimated import BlockScores, EstimatedPrefill
from attnpatch.options import option
from attnpatch.registry import get_method, method_infos
from attnpatch.sparsity import KeyBounds, num_blocks
from attnpatch.sparsity.regions import allowed_blocks, forced_blocks
from attnpatch.sparsity.selectors import CumulativeMass, TopK


def _pooled_scores(query, key, bs, per_kv_head):
    """Mean-pooled q · mean-pooled k per block pair (a toy estimator)."""
    b, hq, lq, d = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    qp = F.pad(query, (0, 0, 0, num_blocks(lq, bs) * bs - lq)).view(b, hq, -1, bs, d).mean(3)
    kp = F.pad(key, (0, 0, 0, num_blocks(lk, bs) * bs - lk)).view(b, hkv, -1, bs, d).mean(3)
    if per_kv_head:
        qp = qp.view(b, hkv, hq // hkv, -1, d).mean(2)
    else:
        kp = kp.repeat_interleave(hq // hkv, 1)
    return qp @ kp.transpose(-1, -2)


@dataclass
class ToyTopK(EstimatedPrefill):
    """Toy: top-k blocks by pooled scores per query head."""

    block_size: int = option(16)
    budget: float = option(2.0, per_head=True)
    sink_blocks: int = option(1)
    local_blocks: int = option(1)
    per_kv: bool = option(False)
    selector: ClassVar = TopK("budget")

    def estimate(self, query, key, ctx):
        return BlockScores(_pooled_scores(query, key, self.block_size, self.per_kv), per_kv_head=self.per_kv)


@dataclass
class ToyMass(ToyTopK):
    """Toy: cumulative softmax mass of the pooled scores."""

    threshold: float = option(0.5, per_head=True)
    selector: ClassVar = CumulativeMass("threshold")

    def estimate(self, query, key, ctx):
        s = _pooled_scores(query, key, self.block_size, self.per_kv) * ctx.scale
        return BlockScores(torch.softmax(s, -1), per_kv_head=self.per_kv)


_inputs = random_qkv


BOUNDS = {"plain": KeyBounds(), "left-padded": KeyBounds(key_start=torch.tensor([0, 30])),
          "window": KeyBounds(window=24), "padded-window": KeyBounds(key_start=torch.tensor([5, 40]), window=33)}


@pytest.mark.parametrize("name", list(BOUNDS))
@pytest.mark.parametrize("lq", [77, 40], ids=["prefill", "chunked"])
def test_selection_invariants(name, lq):
    bounds = BOUNDS[name]
    q, k, _ = _inputs(lq=lq)
    method = ToyTopK(budget=(1.0, 2.0, 3.0, 100.0))
    sel = method.select(q, k, PrefillContext(0, 0.25, bounds, bounds.window))
    sel.validate()  # ascending, in range, causal
    mask = sel.to_block_mask()
    allowed = allowed_blocks(2, lq, 77, 16, 16, bounds)
    assert not (mask & ~allowed).any()  # clipped to causal, window and padding
    r = torch.arange(mask.shape[2])
    last_block = ((r + 1) * 16).clamp(max=lq) - 1 + (77 - lq)
    diag = last_block // 16
    reachable = allowed[:, :, r, diag]  # (a query block entirely in padding keeps nothing)
    assert (mask[:, :, r, diag] | ~reachable).all()  # the diagonal block is always kept
    first = bounds.first_key(2, "cpu")
    for b in range(2):
        reach = allowed[b, 0, :, first[b] // 16]
        assert mask[b, :, reach, first[b] // 16].all()  # the sink: each row's first real token
    # per-head budget: the blocks kept besides the forced ones are at most the head's budget; 100 = all allowed
    forced = forced_blocks(2, lq, 77, 16, 16, bounds, 1, 1) & allowed
    extra = (mask & ~forced).sum(-1)
    assert (extra[:, 0] <= 1).all() and (extra[:, 1] <= 2).all() and (extra[:, 2] <= 3).all()
    assert torch.equal(mask[:, 3], allowed[:, 0])


def test_per_kv_head_scores_give_one_selection_per_group():
    q, k, _ = _inputs(hq=6, hkv=2)
    sel = ToyMass(per_kv=True, threshold=0.7).select(q, k, PrefillContext(0, 0.25, KeyBounds(), None))
    m = sel.to_block_mask()
    assert torch.equal(m[:, 0], m[:, 1]) and torch.equal(m[:, 0], m[:, 2]) and torch.equal(m[:, 3], m[:, 5])
    full = ToyMass(threshold=1.0).select(q, k, PrefillContext(0, 0.25, KeyBounds(), None))
    assert torch.equal(full.to_block_mask(), allowed_blocks(2, 77, 77, 16, 16, KeyBounds()).expand(2, 6, -1, -1))


def test_full_density_equals_dense_attention():
    q, k, v = _inputs()
    bounds = BOUNDS["padded-window"]
    sel = ToyTopK(budget=1000.0).select(q, k, PrefillContext(0, 0.25, bounds, bounds.window))
    out = block_sparse_attention(q, k, v, sel, scale=0.25, bounds=bounds)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bounds.dense_mask(2, 77, 77), scale=0.25,
                                         enable_gqa=True)
    valid = torch.arange(77)[None, :] >= bounds.key_start[:, None]
    torch.testing.assert_close(out[valid[:, None].expand(-1, 4, -1)], ref[valid[:, None].expand(-1, 4, -1)],
                               atol=1e-5, rtol=1e-5)


def test_wrong_scores_shape_is_a_clear_error():
    @dataclass
    class Broken(ToyTopK):
        def estimate(self, query, key, ctx):
            return BlockScores(torch.zeros(1, 1, 1, 1))

    q, k, _ = _inputs()
    with pytest.raises(ValueError, match=r"Broken.estimate returned scores \(1, 1, 1, 1\), expected \(2, 4, 5, 5\)"):
        Broken().select(q, k, PrefillContext(0, 0.25, KeyBounds(), None))


def test_a_token_granularity_method_runs_through_the_patch(llama):
    """A method may return a `TokenSelection` (stripe / permutation methods): the dispatch runs it on a
    backend that takes tokens (the reference here) with padding applied per token."""
    from conftest import left_padded

    import attnpatch
    from attnpatch.methods.base import PrefillMethod
    from attnpatch.registry import _TABLES, register_prefill
    from attnpatch.sparsity import TokenSelection

    @register_prefill("test_stripes")
    @dataclass
    class Stripes(PrefillMethod):
        """Test only: the first 4 keys plus every key within 24 tokens (per token)."""

        block_size: int = option(16)

        def select(self, query, key, ctx):
            b, h, lq, _ = query.shape
            lk = key.shape[2]
            r = num_blocks(lq, self.block_size)
            last = (torch.arange(r) + 1) * self.block_size - 1 + (lk - lq)
            pos = torch.arange(lk).view(1, lk)
            keep = (pos < 4) | ((pos <= last.view(r, 1)) & (pos > last.view(r, 1) - 40))
            order = torch.where(keep, pos, lk + pos).argsort(-1)[:, : int(keep.sum(-1).max())]
            counts = keep.sum(-1).to(torch.int32)
            idx = torch.where(torch.arange(order.shape[-1]) < counts.view(r, 1), order, 0).to(torch.int32)
            return TokenSelection(idx.expand(b, h, r, -1), counts.expand(b, h, r), self.block_size, lq, lk)

    try:
        ids, mask = left_padded(2, 100, [0, 13], seed=2)
        with attnpatch.patch_model(llama, method="test_stripes") as patch, torch.no_grad():
            out = llama(ids, attention_mask=mask).logits
            stats = patch.stats()
        assert stats.backends == {"prefill: reference": 2} and 0 < stats.density < 1
        assert torch.isfinite(out[mask.bool()]).all()
    finally:
        _TABLES["prefill"].pop("test_stripes", None)


def test_window_layers_run_their_window_and_select_time_is_counted():
    """A method applies to full-attention layers; a sliding-window layer runs its window (stats say so),
    unless the method selects inside windows (`on_window_layers = "select"`, as a_shape does)."""
    from conftest import random_ids

    import attnpatch
    from attnpatch.registry import _TABLES, register_prefill
    from attnpatch.testing import tiny_model

    register_prefill("test_toy")(ToyTopK)
    try:
        model = tiny_model("qwen2", sliding_window=8)  # layer 0 full, layer 1 sliding
        with attnpatch.patch_model(model, method="test_toy") as patch, torch.no_grad():
            model(random_ids(1, 96))
            stats = patch.stats()
        full, window = stats.layers
        assert full["density"] < 1 and not full["dense_fallbacks"] and full["select_ms"] > 0
        assert "sliding-window layer: runs its window" in next(iter(window["dense_fallbacks"]))
        assert stats.select_ms == full["select_ms"] + window["select_ms"] and window["select_ms"] == 0
    finally:
        _TABLES["prefill"].pop("test_toy", None)


ESTIMATED = [m for m in method_infos("prefill") if issubclass(m.cls, EstimatedPrefill)]


@pytest.mark.parametrize("lq", [200, 90], ids=["prefill", "chunked"])
@pytest.mark.parametrize("bounds_name", ["plain", "left-padded", "window"])
@pytest.mark.parametrize("info", ESTIMATED, ids=[m.name for m in ESTIMATED])
def test_dense_tail_keeps_every_allowed_key_for_the_last_queries_only(info, bounds_name, lq):
    """`dense_tail` (every score-based method): the query blocks holding the call's last `dense_tail`
    queries keep every key block they may see; the other blocks keep the method's own selection."""
    bounds = {"plain": KeyBounds(), "left-padded": KeyBounds(key_start=torch.tensor([0, 50])),
              "window": KeyBounds(window=120)}[bounds_name]
    options = calibration_options(info.name) | ({"local_blocks": 1} if "local_blocks" in info.option_names else {})
    q, k, _ = _inputs(lq=lq, lk=200, planted=True)
    ctx = PrefillContext(0, 0.25, bounds, bounds.window)
    plain = info.build(options).select(q, k, ctx)
    tailed = info.build(options | {"dense_tail": 20}).select(q, k, ctx)
    assert not isinstance(plain, DenseFallback) and not isinstance(tailed, DenseFallback)
    bs = plain.block_q
    first_tail = (lq - 20) // bs
    allowed = allowed_blocks(2, lq, 200, bs, bs, bounds).expand(-1, q.shape[1], -1, -1)
    got, own = tailed.to_block_mask(), plain.to_block_mask()
    assert torch.equal(got[:, :, first_tail:], allowed[:, :, first_tail:])
    assert torch.equal(got[:, :, :first_tail], own[:, :, :first_tail])


def test_dense_tail_rounds_up_to_whole_query_blocks():
    q, k, _ = _inputs()
    ctx = PrefillContext(0, 0.25, KeyBounds(), None)
    own = ToyTopK(budget=0.0).select(q, k, ctx).to_block_mask()
    got = ToyTopK(budget=0.0, dense_tail=14).select(q, k, ctx).to_block_mask()  # 77 tokens: rows 4 (13) and 3
    allowed = allowed_blocks(2, 77, 77, 16, 16, KeyBounds()).expand(-1, 4, -1, -1)
    assert not torch.equal(own[:, :, 3:], allowed[:, :, 3:])
    assert torch.equal(got[:, :, 3:], allowed[:, :, 3:]) and torch.equal(got[:, :, :3], own[:, :, :3])


def test_dense_tail_is_checked():
    with pytest.raises(ValueError, match="dense_tail"):
        get_method("proxyattn", "prefill").build({"dense_tail": -1})


def test_shape_only_regions_are_kept_per_shape():
    """`allowed_blocks` / `forced_blocks` reuse the shape-only part (same tensor for the same lengths and
    blocks), give each row its own region when the rows are padded, and keep nothing under inference mode."""
    from attnpatch.sparsity import regions

    regions._shape_cache.clear()
    a = allowed_blocks(2, 100, 100, 16, 16, KeyBounds(), None)
    b = allowed_blocks(3, 100, 100, 16, 16, KeyBounds(), None)
    assert a.shape[0] == 2 and b.shape[0] == 3 and a.data_ptr() == b.data_ptr()
    assert allowed_blocks(1, 100, 100, 16, 16, KeyBounds(window=30), None).data_ptr() != a.data_ptr()
    f = forced_blocks(2, 100, 100, 16, 16, KeyBounds(), 1, 2, None)
    assert f.data_ptr() == forced_blocks(2, 100, 100, 16, 16, KeyBounds(), 1, 2, None).data_ptr()
    padded = forced_blocks(2, 100, 100, 16, 16, KeyBounds(key_start=torch.tensor([0, 40])), 1, 2, None)
    assert not torch.equal(padded[0], padded[1])  # the sink follows each row's first real key
    assert torch.equal(padded[0], f[0])
    n = len(regions._shape_cache)
    with torch.inference_mode():
        allowed_blocks(1, 200, 200, 16, 16, KeyBounds(), None)
    assert len(regions._shape_cache) == n
