"""Attention masks in closed form: the mask function attnpatch registers with transformers, and what
the attention function learns from whatever mask it receives.

transformers builds one boolean `[B, 1, Lq, Lk]` mask per forward for padded batches and
sliding-window layers — an L×L tensor. attnpatch registers `attnpatch_mask` instead of `sdpa_mask`:
when the mask transformers asks for is causal (optionally with a sliding window) plus a 2-D padding
mask, it returns an `AttnMask` that holds only the per-key padding `[B, Lk]` and the window, and
builds the dense tensor (by calling `sdpa_mask` with the same arguments, so the dense path stays
bit-identical) only when a dense SDPA call needs it. Any other mask (packed sequences, extra
overlays, static caches whose query offset is a tensor, any mask built inside `torch.compile`) is
handed over as `sdpa_mask` builds it.

`key_bounds` turns what the attention function received (None, an `AttnMask` or a tensor) into a
`KeyBounds`: the closed form executors take (first real key per row, window, per-key validity), or
the raw tensor when it is not of that form.

A decode step (one query) is read without any host sync, so that it can run ahead of the GPU, be
compiled and be captured in a CUDA graph: its mask is one row, i.e. a per-key validity `[B, Lk]`
taken as is (padding anywhere, a sliding window of a tensor mask, and the unwritten slots of a
static cache, whose keys are the whole preallocated buffer), with `key_end` (one past each row's
last valid key, computed on device) so that decode page lists stop at the written length.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.masking_utils import causal_mask_function, sdpa_mask

from attnpatch.sparsity import KeyBounds
from attnpatch.sparsity.bounds import padding_key_validity, sees_later_keys, valid_key_end


def _sliding_window_of(mask_function) -> int | None:
    """The window of transformers' `sliding_window_causal_mask_function(w)`, else None (exact match only)."""
    try:
        funcs = inspect.getclosurevars(mask_function).nonlocals.get("mask_functions")
    except TypeError:
        return None
    if not isinstance(funcs, tuple) or len(funcs) != 2 or funcs[1] is not causal_mask_function:
        return None
    overlay = funcs[0]
    if not getattr(overlay, "__qualname__", "").startswith("sliding_window_overlay."):
        return None
    window = inspect.getclosurevars(overlay).nonlocals.get("sliding_window")
    return window if isinstance(window, int) else None


@dataclass(eq=False)
class AttnMask:
    """A causal (+ sliding window) + padding mask held in closed form.

    Key `j` of the call may be seen by query `i` iff `j <= i + (Lk - Lq)`, `key_valid[b, j]` (when
    given), and `i + (Lk - Lq) - j < window` (when given).
    """

    q_len: int
    kv_len: int
    key_valid: torch.Tensor | None  # [B, kv_len] bool; None: no key is padding
    window: int | None
    sdpa_kwargs: dict[str, Any] = field(repr=False)
    _dense: Any = field(default=None, repr=False)
    _dense_built: bool = field(default=False, repr=False)
    _bounds: Any = field(default=None, repr=False)  # the KeyBounds derived from it (cached by `key_bounds`)
    _decode: dict = field(default_factory=dict, repr=False)  # kv_len -> a decode step's KeyBounds (`_decode_bounds`)
    step_row: bool = field(default=False, repr=False)  # wraps a one-query step's tensor row (`_built_mask`)

    def dense(self) -> torch.Tensor | None:
        """The mask `sdpa_mask` builds for these arguments (what the unpatched model would get); cached."""
        if not self._dense_built:
            self._dense = sdpa_mask(**self.sdpa_kwargs)
            self._dense_built = True
        return self._dense


def attnpatch_mask(**kwargs: Any):
    """Mask function registered with `AttentionMaskInterface`: an `AttnMask` when the request is causal
    (+ window) + padding with queries aligned to the end of the keys, else what `sdpa_mask` returns."""
    fn = kwargs.get("mask_function", causal_mask_function)
    q_len, kv_len = kwargs.get("q_length"), kwargs.get("kv_length")
    q_off, kv_off = kwargs.get("q_offset", 0), kwargs.get("kv_offset", 0)
    local = kwargs.get("local_size")
    window = None
    if torch.compiler.is_compiling():  # a compiled step takes the tensor (the analysis below inspects closures)
        return _built_mask(kwargs)
    if kwargs.get("use_vmap") or not all(isinstance(x, int) for x in (q_len, kv_len, q_off, kv_off)):
        return _built_mask(kwargs)
    if fn is not causal_mask_function:
        window = _sliding_window_of(fn)
        if window is None or window != local:
            return _built_mask(kwargs)
    elif local is not None:
        return _built_mask(kwargs)
    if q_off - kv_off != kv_len - q_len:  # e.g. a static cache: keys past the queries are empty slots
        return _built_mask(kwargs)
    padding = kwargs.get("attention_mask")
    key_valid = None
    if padding is not None:
        if padding.dim() != 2 or padding.dtype != torch.bool:
            return _built_mask(kwargs)
        if padding.shape[-1] < kv_off + kv_len:
            padding = torch.nn.functional.pad(padding, (0, kv_off + kv_len - padding.shape[-1]))
        key_valid = padding[:, kv_off: kv_off + kv_len]
    if window is not None and window >= kv_len:
        window = None  # no query can reach past its window
    return AttnMask(q_len, kv_len, key_valid, window, dict(kwargs))


def _built_mask(kwargs: dict[str, Any]):
    """What `sdpa_mask` builds for `kwargs`; a one-query step's boolean row `[B, 1, 1, Lk]` comes wrapped in
    an `AttnMask` over that row (no window: the row holds it), so that the layers of the step share one
    derivation of its bounds — a compiled step otherwise repeats the reductions over the row in every
    layer (≈ 30 µs a layer at 128K, batch 4, on the H200). The wrapped tensor is what `dense()` returns."""
    dense = sdpa_mask(**kwargs)
    if (isinstance(dense, torch.Tensor) and dense.dtype == torch.bool and dense.dim() == 4
            and dense.shape[1] == 1 and dense.shape[2] == 1):
        return AttnMask(1, dense.shape[-1], dense[:, 0, 0, :], None, dict(kwargs), _dense=dense, _dense_built=True,
                        step_row=True)
    return dense


def first_real_key(key_valid: torch.Tensor) -> torch.Tensor | None:
    """`[B]` first valid key per row when `key_valid` `[B, L]` is left padding, else None (one host sync)."""
    start = key_valid.to(torch.int8).argmax(dim=-1)
    left = torch.arange(key_valid.shape[-1], device=key_valid.device) >= start.unsqueeze(-1)
    return start if torch.equal(key_valid, left) else None


# transformers hands the same mask object to every layer of a forward: the analysis below (a pass over
# the mask plus a host sync) runs once per mask object, not once per layer.
_LAST: list = [None, None, None]


def key_bounds(mask: Any, q_len: int, kv_len: int, window: int | None,
               positions: torch.Tensor | None = None) -> KeyBounds:
    """The closed form of what the attention function received for a call with `q_len` queries and
    `kv_len` keys on a layer with sliding `window` (None: full attention).

    `positions`: the original position of every key the cache returned (`[L]`, or `[B, L]` per
    row), when they are not `0..kv_len-1` (a cache that evicts, such as the sink + window cache).
    """
    if mask is None:
        return KeyBounds(window=window if window is not None and window < kv_len else None)
    if q_len == 1:
        bounds = _decode_bounds(mask, kv_len, positions)
        if bounds is not None:
            return bounds
    if isinstance(mask, AttnMask):
        valid = mask.key_valid
        if positions is not None and valid is not None:
            valid = _take_keys(valid, positions)
        if valid is not None and valid.shape[-1] != kv_len:
            dense = mask.dense()
            return KeyBounds(mask=dense) if dense is not None else KeyBounds(window=mask.window)
        return _with_validity(valid, mask.window, mask if positions is None else None)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"unexpected attention mask of type {type(mask).__name__}")
    if positions is not None and mask.shape[-1] != kv_len:
        mask = _take_keys(mask, positions)
    if _LAST[0] is mask and _LAST[1] == (q_len, kv_len, window):
        return _LAST[2]
    if mask.dtype == torch.bool and mask.dim() == 4 and sees_later_keys(mask, q_len, kv_len):
        bounds = KeyBounds(mask=mask, causal=False)
    elif window is not None and window < kv_len:  # taken as is (the window clips the blocks to visit)
        bounds = KeyBounds(window=window, mask=mask)
    else:
        try:
            bounds = _with_validity(padding_key_validity(mask, q_len, kv_len), None, None)
        except ValueError:
            bounds = KeyBounds(mask=mask)
    _LAST[:] = [mask, (q_len, kv_len, window), bounds]
    return bounds


def _decode_bounds(mask: Any, kv_len: int, positions: torch.Tensor | None) -> KeyBounds | None:
    """A decode step's bounds as the mask's one row of per-key validity (no host sync), or None when
    the mask is not of that kind (no padding at all, per-head rows, a float mask)."""
    if isinstance(mask, AttnMask) and mask.step_row and positions is not None:
        mask = mask.dense()  # keys an evicting cache returned: read as the tensor row it wraps (below)
    if isinstance(mask, AttnMask):
        valid, window = mask.key_valid, mask.window
        if valid is None:
            return None
        if positions is None:  # every layer of the step gets this mask object: derive the bounds once
            if kv_len not in mask._decode:
                mask._decode[kv_len] = _validity_bounds(valid, window, kv_len, with_first=True)
            return mask._decode[kv_len]
        valid = _take_keys(valid, positions)
    elif (isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.dim() == 4
          and mask.shape[1] == 1 and mask.shape[2] == 1):
        valid, window = mask[:, 0, 0, :], None  # the row already holds any window
        if positions is not None and valid.shape[-1] != kv_len:
            valid = _take_keys(valid, positions)
    else:
        return None
    return _validity_bounds(valid, window, kv_len)


def _validity_bounds(valid: torch.Tensor, window: int | None, kv_len: int, with_first: bool = False
                     ) -> KeyBounds | None:
    """Bounds from one row of per-key validity; `with_first` precomputes each row's first valid key (worth
    it where the bounds are shared by every layer of the step, else `first_key` derives it on demand)."""
    if valid.shape[-1] != kv_len:
        return None
    first = valid.to(torch.int8).argmax(-1) if with_first else None
    return KeyBounds(key_valid=valid, window=window, key_end=valid_key_end(valid), key_first=first)


def _take_keys(t: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The last-dim columns of `t` (`[B, ..., Lv]`) at `positions` (`[L]`, or `[B, L]` per row)."""
    positions = positions.to(t.device)
    if positions.dim() == 1:
        return t.index_select(-1, positions)
    index = positions.view(positions.shape[0], *([1] * (t.dim() - 2)), positions.shape[-1])
    return torch.gather(t, -1, index.expand(*t.shape[:-1], positions.shape[-1]))


def _with_validity(valid: torch.Tensor | None, window: int | None, owner: AttnMask | None) -> KeyBounds:
    if valid is None:
        return KeyBounds(window=window)
    cache = getattr(owner, "_bounds", None) if owner is not None else None
    if cache is not None and cache.window == window:
        return cache
    if bool(valid.all()):
        bounds = KeyBounds(window=window)
    else:
        start = first_real_key(valid)
        bounds = KeyBounds(key_start=start, window=window) if start is not None else \
            KeyBounds(key_valid=valid, window=window)
    if owner is not None:
        owner._bounds = bounds
    return bounds
