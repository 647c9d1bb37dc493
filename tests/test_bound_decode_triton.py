"""The one-launch page-bound decode step (bounds + top-k + split-KV attention) under the Triton CPU
interpreter: the same lists and the same output as the separate kernels it fuses."""

from __future__ import annotations

import pytest
import torch
from triton_interpreted import PACKAGE_DIR, interpret_env, load_interpreted

from attnpatch.cache import key_page_bounds
from attnpatch.cache.pages import barrier_counters
from attnpatch.sparsity import PageSelection

_bd, _SKIP_REASON = load_interpreted("bound_decode.py", uses=("decode.py", "topk_select.py"))
if _bd is not None:
    _pb, _ = load_interpreted("page_bounds_triton.py", PACKAGE_DIR / "estimators")
    _ts, _ = load_interpreted("topk_select.py")
    _dec, _ = load_interpreted("decode.py")
pytestmark = pytest.mark.skipif(_bd is None, reason=_SKIP_REASON or "")


@pytest.fixture(autouse=True)
def _interpreted():
    with interpret_env():
        yield


def _separate(q, k, v, lo, hi, n, kp, first, end, ps, scale, keep_last, combine, **attend):
    bounds = _pb.page_upper_bounds_triton(q, lo, hi, n, scale)
    idx, counts = _ts.group_topk_ascending_triton(bounds, kp, first, end, combine, keep_last)
    out = _dec.sparse_decode_attention(q, k, v, PageSelection(idx, counts, ps, k.shape[2]), scale=scale, **attend)
    return out, idx, counts


CASES = [  # B, Hkv, G, D, L, page, k pages, splits, combine, keep_last
    (2, 2, 4, 64, 2048, 64, 8, None, "softmax_sum", 0),
    (1, 3, 3, 64, 1000, 32, 6, 3, "max", 1),
    (2, 1, 2, 32, 520, 16, 5, 2, "softmax_sum", 0),
    (1, 2, 1, 32, 300, 16, 19, 1, "softmax_sum", 2),  # k = every page: the whole cache
]


@pytest.mark.parametrize(("b", "hkv", "g", "d", "length", "ps", "kp", "splits", "combine", "keep_last"), CASES)
@pytest.mark.parametrize("validity", ["none", "key_start", "key_valid"])
def test_one_launch_equals_the_separate_kernels(b, hkv, g, d, length, ps, kp, splits, combine, keep_last, validity):
    gen = torch.Generator().manual_seed(length + kp)
    q = torch.randn(b, hkv * g, 1, d, generator=gen)
    k = torch.randn(b, hkv, length, d, generator=gen)
    v = torch.randn(b, hkv, length, d, generator=gen)
    lo, hi = key_page_bounds(k, ps)
    n = lo.shape[2]
    first = torch.tensor([0, 1][:b])
    end = torch.tensor([n, n - 2][:b])  # the second row's last pages are not written yet
    attend = {}
    if validity == "key_start":
        attend["key_start"] = first * ps + 3
    elif validity == "key_valid":
        valid = torch.rand(b, length, generator=gen) > 0.2
        attend["key_valid"] = valid
    scale = d ** -0.5
    out, (idx, counts) = _bd.bound_decode_attention(q, k, v, lo, hi, n, kp, first, end, page_size=ps, scale=scale,
                                                    keep_last=keep_last, combine=combine, num_splits=splits,
                                                    return_selection=True, **attend)
    ref, ref_idx, ref_counts = _separate(q, k, v, lo, hi, n, kp, first, end, ps, scale, keep_last, combine, **attend)
    assert torch.equal(idx, ref_idx) and torch.equal(counts, ref_counts)
    assert out.shape == (b, hkv * g, 1, d)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_counters_are_left_at_zero_for_the_next_call():
    """The per-device buffer and a caller's counters (a cache layer's `barrier_counters`) alike are back at
    zero after a call, and both give the same output."""
    q, k, v = torch.randn(1, 4, 1, 32), torch.randn(1, 2, 256, 32), torch.randn(1, 2, 256, 32)
    lo, hi = key_page_bounds(k, 16)
    first = _bd.bound_decode_attention(q, k, v, lo, hi, 16, 4, 0, 16, page_size=16, scale=0.2, num_splits=3)
    assert _bd._semaphores(q.device, 4).eq(0).all()
    counters = barrier_counters(1, 2, "cpu")
    again = _bd.bound_decode_attention(q, k, v, lo, hi, 16, 4, 0, 16, page_size=16, scale=0.2, num_splits=3,
                                       counters=counters)
    assert torch.equal(first, again) and counters.eq(0).all()
    with pytest.raises(ValueError, match="counters must be contiguous int32 on cpu with at least 4 elements"):
        _bd.bound_decode_attention(q, k, v, lo, hi, 16, 4, 0, 16, page_size=16, scale=0.2, counters=counters[:3])


@pytest.mark.parametrize(("change", "message"), [
    ({"kp": 17}, "k = 17 outside 1..16"),
    ({"page_size": 8}, "page size 8; allowed"),
    ({"combine": "mean"}, "combine must be one of"),
    ({"lo_dtype": torch.float16}, "dtypes"),
    ({"n_pages": 20}, "page tables of shape"),
])
def test_bad_input_is_refused_with_what_is_allowed(change, message):
    q, k, v = torch.randn(1, 4, 1, 32), torch.randn(1, 2, 256, 32), torch.randn(1, 2, 256, 32)
    lo, hi = key_page_bounds(k, 16)
    if "lo_dtype" in change:
        lo, hi = lo.to(change["lo_dtype"]), hi.to(change["lo_dtype"])
    with pytest.raises(ValueError, match=message):
        _bd.bound_decode_attention(q, k, v, lo, hi, change.get("n_pages", 16), change.get("kp", 4), 0, 16,
                                   page_size=change.get("page_size", 16), scale=0.2,
                                   combine=change.get("combine", "softmax_sum"))


def test_many_rows_on_a_gpu_keep_the_separate_kernels(monkeypatch):
    """The backend's speed rule: on a GPU, fewer than MIN_SPLITS programs per KV head declines (with the count);
    the interpreter (CPU) always takes the call, so the tests above run the kernel."""
    q, k = torch.randn(8, 32, 1, 128), torch.randn(8, 8, 4096, 128)
    assert _bd.few_programs_reason(q, k, 32, 128) is None  # CPU
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(_bd, "_sm_count", lambda device: 132)
    assert "64 (batch × KV head) rows leave 2 program(s)" in _bd.few_programs_reason(q, k, 32, 128)
    assert _bd.few_programs_reason(q[:1], k[:1], 32, 128) is None  # 8 rows: 16 programs per head
    assert _bd.choose_splits(8, 64, "cuda", requested=32) == 16  # a cooperative launch must fit one per SM
    assert _bd.choose_splits(8, 64, "cpu", requested=32) == 32  # the interpreter runs programs in turn


@pytest.mark.parametrize("setting,expect", [(None, _bd.DEFAULT_MODE if _bd else None), ("auto", "auto"),
                                            ("off", "off"), ("on", "on"), ("0,4,3", "on")])
def test_the_switch_and_the_row_rule(monkeypatch, setting, expect):
    """"auto" takes the kernel up to MAX_ROWS batch × KV head rows (where it measured faster) and names the rows
    above; "off" never; "on" or a launch whenever it can run; unset, DEFAULT_MODE. A malformed launch is refused."""
    if setting is None:
        monkeypatch.delenv("ATTNPATCH_BOUND_DECODE_CONFIG", raising=False)
    else:
        monkeypatch.setenv("ATTNPATCH_BOUND_DECODE_CONFIG", setting)
    assert _bd.mode() == expect
    q, k = torch.randn(4, 32, 1, 128), torch.randn(4, 8, 256, 128)
    assert _bd.too_many_rows_reason(q[:1], k[:1]) is None
    assert "32 (batch × KV head) rows: above 8" in _bd.too_many_rows_reason(q, k)
    monkeypatch.setenv("ATTNPATCH_BOUND_DECODE_CONFIG", "16,4")
    with pytest.raises(ValueError, match="'on', 'auto', 'off' or 'splits,warps,stages'"):
        _bd.launch_config()
