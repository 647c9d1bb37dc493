"""Executor selection helpers: what the fast kernels can take from transformers' masks."""

import torch

from attnpatch.kernels import _left_padding


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
