"""Inputs and helpers the prefill-method tests share: random Q/K/V, the key-bounds cases, a context,
token lists as Python lists."""

from __future__ import annotations

import torch

from attnpatch.methods.base import PrefillContext
from attnpatch.sparsity import KeyBounds

# padding, per-key validity and windows on a 77-token input of batch 2
BOUNDS_CASES = {
    "plain": KeyBounds(),
    "left-padded": KeyBounds(key_start=torch.tensor([0, 30])),
    "key-valid": KeyBounds(key_valid=torch.arange(77).view(1, -1).expand(2, -1) % 13 != 5),
    "window": KeyBounds(window=40),
}


def random_qkv(b=2, hq=4, hkv=2, lq=77, lk=77, d=16, seed=0, planted=False):
    """Gaussian `(q [b, hq, lq, d], k [b, hkv, lk, d], v)`; `planted`: keys 30..32 drawn toward the
    mean query of every other head (heavy keys / stripes)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=g)
    k = torch.randn(b, hkv, lk, d, generator=g)
    if planted:
        k[:, :, 30:33] += 2.0 * q.mean((0, 2)).view(1, hq, d)[:, ::2].unsqueeze(2)
    return q, k, torch.randn(b, hkv, lk, d, generator=g)


def prefill_ctx(scale: float, bounds: KeyBounds | None = None) -> PrefillContext:
    bounds = bounds or KeyBounds()
    return PrefillContext(0, scale, bounds, bounds.window)


def token_lists(sel) -> list:
    """A TokenSelection's lists as nested Python lists `[b][h][r]`."""
    b, h, r, _ = sel.indices.shape
    return [[[sel.indices[i, j, k, :sel.counts[i, j, k]].tolist() for k in range(r)] for j in range(h)]
            for i in range(b)]


def small_options(info) -> dict:
    """The smallest block / page sizes a method allows, so tiny inputs span many blocks, and no minimum
    input length (`min_length`), so tiny inputs are not sent to dense."""
    out = {}
    for o in info.options:
        if o.name in ("block_size", "page_size") and o.choices:
            out[o.name] = min(c for c in o.choices if c)  # 0 is "chosen from the budget"
        if o.name == "min_length":
            out[o.name] = 0
    return out


# Options that let a calibratable method drop keys on 192-token inputs beyond the registry-derived small
# sizes; a new calibratable method is tested with `small_options` alone.
CALIBRATION_REFINE = {"xattention": {"stride": 4}, "sale": {"local_window": 16}, "flexprefill": {"min_budget": 0},
                      "s2o": {"pool_size": 8}, "anchor": {"step": 4, "max_keys": 1 << 20}}


def calibration_options(name: str) -> dict:
    """`small_options` of prefill method `name` plus its `CALIBRATION_REFINE`."""
    from attnpatch.registry import get_method

    return small_options(get_method(name, "prefill")) | CALIBRATION_REFINE.get(name, {})


class CharTokenizer:
    """A stand-in tokenizer for the JSONL calibration path: one id per character."""

    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        class Out:
            input_ids = torch.tensor([[3 + ord(c) % 200 for c in text]])
        return Out()
