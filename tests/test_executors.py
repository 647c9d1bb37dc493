"""Executor selection helpers: what the fast kernels can take from transformers' masks."""

import torch

from attnpatch.backends import _left_padding


def _mask(valid: torch.Tensor, lq: int, window: int | None = None) -> torch.Tensor:
    lk = valid.shape[1]
    q = torch.arange(lq)[:, None] + (lk - lq)
    kv = torch.arange(lk)[None, :]
    m = kv <= q
    if window is not None:
        m &= kv > q - window
    return (m[None] & valid[:, None, :])[:, None]


def test_left_padding_gives_the_first_real_key():
    valid = torch.arange(20)[None, :] >= torch.tensor([[0], [7]])
    start, reason = _left_padding(_mask(valid, 20), 20, 20)
    assert reason is None and start.tolist() == [0, 7]


def test_other_masks_are_refused_with_a_reason():
    right = torch.arange(20)[None, :] < torch.tensor([[20], [15]])
    _, reason = _left_padding(_mask(right, 20), 20, 20)
    assert "not left padding" in reason
    window = torch.ones(1, 20, dtype=torch.bool)
    _, reason = _left_padding(_mask(window, 20, window=4), 20, 20)
    assert "not causal + padding" in reason


def test_kernel_glue_passes_the_skip_rule_and_adds_counters():
    import math

    from attnpatch.backends import _run_kernel
    from attnpatch.sparsity import PageSelection, SkipRule

    seen = {}

    def kernel(q, k, v, sel, **kw):
        seen.update(kw)
        return q * 2, (torch.tensor(7), torch.tensor(3))

    counts = torch.zeros(2, dtype=torch.int64)
    sel = PageSelection.all_pages(1, 1, 10, 16, skip=SkipRule(math.log(0.25)))
    out = _run_kernel(kernel, torch.ones(2), None, None, sel, 0.5, torch.tensor([4]), counts)
    assert torch.equal(out, torch.full((2,), 2.0)) and counts.tolist() == [7, 3]
    assert abs(seen["skip_threshold"] - 0.25) < 1e-12 and seen["skip_convention"] == "scaled"
    assert seen["key_start"].tolist() == [4] and seen["count_tiles"] and seen["scale"] == 0.5


def test_left_padding_is_checked_once_per_mask():
    valid = torch.arange(20)[None, :] >= torch.tensor([[0], [7]])
    mask = _mask(valid, 20)
    first, _ = _left_padding(mask, 20, 20)
    again, _ = _left_padding(mask, 20, 20)
    assert again is first  # the same mask (shared by every layer of a forward) is not re-read
    other, _ = _left_padding(_mask(valid, 20), 20, 20)
    assert other is not first and other.tolist() == [0, 7]
