"""The ascending top-k selection kernel (page lists of Quest / Recycled) under the Triton CPU interpreter."""

from __future__ import annotations

import pytest
import torch
from triton_interpreted import interpret_env, load_interpreted

_ts, _SKIP_REASON = load_interpreted("topk_select.py")
pytestmark = pytest.mark.skipif(_ts is None, reason=_SKIP_REASON or "")


@pytest.fixture(autouse=True)
def _interpreted():
    with interpret_env():
        yield


def _expected(scores: torch.Tensor, k: int) -> list[list[int]]:
    out = []
    for row in scores.reshape(-1, scores.shape[-1]):
        ok = row > float("-inf")
        top = row.masked_fill(~ok, float("-inf")).topk(min(k, int(ok.sum()))).indices if ok.any() else row[:0].long()
        out.append(sorted(top.tolist()))
    return out


@pytest.mark.parametrize("search", ["0,4", "1,4"])
@pytest.mark.parametrize(("rows", "n", "k"), [(6, 100, 7), (4, 513, 32), (3, 64, 64), (2, 1000, 1)])
def test_the_k_largest_in_ascending_order(rows, n, k, search, monkeypatch):
    monkeypatch.setenv("ATTNPATCH_TOPK_CONFIG", search)
    g = torch.Generator().manual_seed(n + k)
    scores = torch.randn(rows, n, generator=g) * torch.logspace(-3, 3, rows).view(-1, 1)  # wide ranges, negatives
    scores[0, :5] = torch.finfo(torch.float32).max  # forced entries (as top_pages marks them)
    idx, counts = _ts.topk_ascending_triton(scores.view(rows, 1, n), k)
    assert idx.shape == (rows, 1, k) and counts.shape == (rows, 1) and idx.dtype == counts.dtype == torch.int32
    assert counts.eq(k).all()
    assert idx.view(rows, k).tolist() == _expected(scores, k)


def test_minus_inf_is_never_chosen_and_short_rows_pad_with_zeros():
    scores = torch.full((3, 40), float("-inf"))
    scores[0, [3, 17, 30]] = torch.tensor([1.0, -2.0, 0.5])  # 3 valid entries, k = 5
    scores[1, :] = torch.arange(40.0)
    scores[1, 10:20] = float("-inf")
    idx, counts = _ts.topk_ascending_triton(scores, 5)
    assert counts.tolist() == [3, 5, 0]
    assert idx[0].tolist() == [3, 17, 30, 0, 0] and idx[1].tolist() == [35, 36, 37, 38, 39]
    assert idx[2].tolist() == [0] * 5


def test_ties_keep_the_lowest_indices():
    scores = torch.zeros(2, 50)
    scores[0, 7] = 2.0
    scores[1] = -1.0
    idx, counts = _ts.topk_ascending_triton(scores, 4)
    assert counts.tolist() == [4, 4]
    assert idx[0].tolist() == [0, 1, 2, 7] and idx[1].tolist() == [0, 1, 2, 3]


def _group_reference(scores, k, first, end, combine, keep_last):
    """What Quest's torch path selects: masks, group combine, forced pages, then the k best."""
    b, h, _, n = scores.shape
    pages = torch.arange(n)
    end = torch.as_tensor(end).expand(b).view(b, 1)
    first = torch.as_tensor(first).view(b, 1)
    valid = (pages >= first) & (pages < end)  # [B, n]
    forced = valid & ((pages == first) | ((pages < end) & (pages >= end - 1 - keep_last)))
    masked = scores.masked_fill(~valid.view(b, 1, 1, n), float("-inf"))
    score = masked.amax(2) if combine == "max" else torch.softmax(masked, -1).sum(2)
    score = torch.where(forced.view(b, 1, n), torch.finfo(torch.float32).max, score)
    return _expected(score.masked_fill(~valid.view(b, 1, n), float("-inf")), k)


@pytest.mark.parametrize("search", ["0,4", "1,4"])
@pytest.mark.parametrize("combine", ["softmax_sum", "max"])
@pytest.mark.parametrize(("end", "keep_last"), [(140, 0), ([150, 90, 30], 2)])
def test_group_kernel_combines_masks_and_forces_like_the_torch_path(combine, end, keep_last, search, monkeypatch):
    monkeypatch.setenv("ATTNPATCH_TOPK_CONFIG", search)
    g = torch.Generator().manual_seed(11)
    scores = torch.randn(3, 2, 3, 150, generator=g) * 4
    first = torch.tensor([0, 5, 17])
    end_arg = torch.tensor(end) if isinstance(end, list) else torch.tensor(end)
    idx, counts = _ts.group_topk_ascending_triton(scores, 12, first, end_arg, combine, keep_last)
    assert idx.shape == (3, 2, 12) and counts.shape == (3, 2)
    want = _group_reference(scores, 12, first, end_arg, combine, keep_last)
    got = [row[:c].tolist() for row, c in zip(idx.view(6, 12), counts.view(6).tolist(), strict=True)]
    assert got == want
    assert all(first[i // 2].item() in got[i] for i in range(6))  # the sink page is always in


def test_group_kernel_selects_only_where_its_flag_is_set(monkeypatch):
    """A compiled Recycled step launches the selection every step with the device flag "refresh now": set,
    the same lists as without a flag; clear, the kernel returns at once and leaves both outputs unwritten."""
    g = torch.Generator().manual_seed(12)
    scores, first = torch.randn(2, 2, 3, 64, generator=g), torch.tensor([0, 3])
    plain = _ts.group_topk_ascending_triton(scores, 8, first, 60)
    flagged = _ts.group_topk_ascending_triton(scores, 8, first, 60, flag=torch.tensor([1], dtype=torch.int32))
    assert all(torch.equal(a, b) for a, b in zip(plain, flagged, strict=True))
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: empty(*a, **kw).fill_(-7))  # marks unwritten entries
    idx, counts = _ts.group_topk_ascending_triton(scores, 8, first, 60, flag=torch.tensor([0], dtype=torch.int32))
    assert idx.eq(-7).all() and counts.eq(-7).all()


def test_group_kernel_rejects_bad_arguments():
    with pytest.raises(ValueError, match="combine must be one of"):
        _ts.group_topk_ascending_triton(torch.zeros(1, 1, 2, 8), 2, 0, 8, "mean")
    with pytest.raises(ValueError, match=r"need \[B, H, G, n\]"):
        _ts.group_topk_ascending_triton(torch.zeros(1, 2, 8), 2, 0, 8)
    with pytest.raises(ValueError, match="shape \\(2,\\)"):
        _ts.group_topk_ascending_triton(torch.zeros(2, 1, 2, 8), 2, torch.zeros(3, dtype=torch.long), 8)


def test_declined_inputs_name_the_reason():
    assert "at most" in _ts.group_unsupported_reason(torch.zeros(1, 1, 8, _ts.MAX_GROUP_N // 4), 2)
    assert "float32" in _ts.unsupported_reason(torch.zeros(2, 8, dtype=torch.float16), 2)
    assert "at most" in _ts.unsupported_reason(torch.zeros(1, _ts.MAX_N + 1), 2)
    assert "outside" in _ts.unsupported_reason(torch.zeros(1, 8), 9)
    with pytest.raises(ValueError, match="outside"):
        _ts.topk_ascending_triton(torch.zeros(1, 8), 0)


@pytest.mark.parametrize("method", ["quest", "recycled"])
def test_methods_select_the_same_pages_with_the_kernel(method, monkeypatch):
    """Quest / Recycled with `topk="triton"` (the interpreted kernel standing in for the GPU one) list the
    same pages as with torch.topk, on a left-padded batch."""
    import attnpatch.backends.triton.topk_select as package_kernel
    from attnpatch.methods.base import DecodeContext
    from attnpatch.methods.decode.quest import Quest
    from attnpatch.methods.decode.recycled import Recycled
    from attnpatch.sparsity import KeyBounds
    from attnpatch.testing import tiny_config

    monkeypatch.setattr(package_kernel, "unsupported_reason", _ts.unsupported_reason)
    monkeypatch.setattr(package_kernel, "topk_ascending_triton", _ts.topk_ascending_triton)
    monkeypatch.setattr(package_kernel, "group_topk_ascending_triton", _ts.group_topk_ascending_triton)
    monkeypatch.setattr(package_kernel, "group_unsupported_reason", _ts.group_unsupported_reason)
    g = torch.Generator().manual_seed(3)
    q, keys = torch.randn(2, 4, 1, 16, generator=g), torch.randn(2, 2, 300, 16, generator=g)
    bounds = KeyBounds(key_start=torch.tensor([0, 37]))
    picked = {}
    for kernel in ("torch", "triton"):
        if method == "quest":
            m = Quest(budget=96, page_size=16, dense_layers=0, topk=kernel)
            layer = m.cache_layer(0, tiny_config("llama"))
            layer.update(keys, keys.clone())
            sel = m.select(q, layer.keys, DecodeContext(0, 0.25, bounds, None, layer))
        else:
            m = Recycled(budget=96, page_size=16, stride=4, topk=kernel)
            layer = m.cache_layer(0, tiny_config("llama"))
            layer.update(keys, keys.clone())
            ctx = DecodeContext(0, 0.25, bounds, None, layer)
            assert m.select(q, layer.keys, ctx) is None  # the refresh step runs dense and records the pages
            step = torch.randn(2, 2, 1, 16, generator=torch.Generator().manual_seed(4))
            layer.update(step, step.clone())  # the next token: the recorded pages are reused
            sel = m.select(q, layer.keys, DecodeContext(0, 0.25, bounds, None, layer))
        picked[kernel] = sel
    assert torch.equal(picked["torch"].counts, picked["triton"].counts)
    assert torch.equal(picked["torch"].indices, picked["triton"].indices)


@pytest.mark.parametrize("bad", ["1", "1,8,3", "x,8", "1,8,4,0", "3,8", "2,6"])
def test_launch_override_is_checked(bad, monkeypatch):
    monkeypatch.setenv("ATTNPATCH_TOPK_CONFIG", bad)
    with pytest.raises(ValueError, match="ATTNPATCH_TOPK_CONFIG"):
        _ts.launch_config(2048)


_BITONIC_CHECK = """
import os
os.environ["TRITON_INTERPRET"] = "1"  # before triton's import: tl.topk is a library @jit helper
os.environ["ATTNPATCH_TOPK_CONFIG"] = "2,4"
import torch
from attnpatch.backends.triton import topk_select as ts
g = torch.Generator().manual_seed(5)
for rows, n, k in [(4, 100, 7), (3, 513, 32), (2, 64, 64), (2, 300, 1)]:
    s = torch.randn(rows, n, generator=g) * torch.logspace(-3, 3, rows).view(-1, 1)
    s[0, :5] = torch.finfo(torch.float32).max
    s[1, ::3] = float("-inf")
    idx, counts = ts.topk_ascending_triton(s, k)
    for r in range(rows):
        ok = s[r] > float("-inf")
        want = sorted(s[r].topk(min(k, int(ok.sum()))).indices.tolist())
        assert idx[r, :counts[r]].tolist() == want and counts[r] == len(want), (rows, n, k, r)
short = torch.full((2, 40), float("-inf"))
short[0, [3, 17, 30]] = torch.tensor([1.0, -2.0, 0.5])
idx, counts = ts.topk_ascending_triton(short, 5)
assert counts.tolist() == [3, 0] and idx[0].tolist() == [3, 17, 30, 0, 0], idx
ties = torch.zeros(1, 50)
ties[0, 7] = 2.0
assert ts.topk_ascending_triton(ties, 4)[0][0].tolist() == [0, 1, 2, 7]
sc = torch.randn(2, 3, 4, 200, generator=g)
args = (sc, 16, torch.tensor([0, 3]), torch.tensor([200, 150]), "softmax_sum", 1)
bitonic = ts.group_topk_ascending_triton(*args)
os.environ["ATTNPATCH_TOPK_CONFIG"] = "0,4"
radix = ts.group_topk_ascending_triton(*args)
assert torch.equal(bitonic[0], radix[0]) and torch.equal(bitonic[1], radix[1])
"""


def test_bitonic_search_selects_what_the_radix_search_does():
    """Search 2 (`tl.topk`'s bitonic network finds the k-th largest): the same lists as torch.topk and as the
    radix search, with -inf never chosen, short rows padded and ties kept at the lowest indices. A fresh
    process with TRITON_INTERPRET set before triton's import, which library helpers such as tl.topk need."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    res = subprocess.run([sys.executable, "-c", _BITONIC_CHECK], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
