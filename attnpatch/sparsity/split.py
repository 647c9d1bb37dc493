"""The one full/partial split of a selection: which listed key blocks (or key positions, with
`block_k = 1`) some row of their query block may see (*visible*), and which every row may see whole
(*full*), so an executor can skip the mask there.

Per query block the test is two ranges of key-block indices: a block is visible iff its index lies
in `[a_lo, a_hi)` and full iff also in `[f_lo, f_hi)`, where (queries aligned to the end of the
keys, rows at positions `first_q..last_q`):

* causal: visible blocks start at or before `last_q`; full blocks end at or before `first_q` (so a
  ragged last block is never full);
* sliding window `w`: visible blocks end after `first_q - w`; full blocks start after `last_q - w`;
* left padding: visible blocks end at or after `key_start`, and only when `key_start <= last_q`;
  full blocks start at or after `key_start`;
* per-key validity (padding that is not left padding): visible blocks hold a valid key, full blocks
  only valid keys.

Listed blocks that are not visible compute nothing: executors may drop them.
"""

from __future__ import annotations

import functools

import torch

from attnpatch.sparsity.bounds import KeyBounds
from attnpatch.sparsity.selection import num_blocks

_CHUNK = 1 << 24  # list slots per slice of heads (bounds the boolean temporaries)


@functools.lru_cache(maxsize=64)
def _row_bounds(n_qb: int, bq: int, bk: int, lq: int, lk: int, window: int | None, device: torch.device):
    """Per query block `(a_lo, a_hi, f_lo, f_hi, last_q)` without padding, int64 `[1, 1, R, 1]` each.
    Cached: no kernel launch on a repeated shape."""
    off = lk - lq
    r = torch.arange(n_qb, device=device, dtype=torch.int64)
    first_q = r * bq + off
    last_q = torch.clamp((r + 1) * bq, max=lq) - 1 + off
    a_hi = torch.clamp(last_q // bk + 1, max=num_blocks(lk, bk))
    f_hi = (first_q + 1) // bk
    a_lo = torch.zeros_like(r)
    f_lo = torch.zeros_like(r)
    if window is not None:
        a_lo = torch.clamp((first_q - window + 1).div(bk, rounding_mode="floor"), min=0)
        f_lo = torch.clamp(-((window - 1 - last_q).div(bk, rounding_mode="floor")), min=0)
    return tuple(t.view(1, 1, n_qb, 1) for t in (a_lo, a_hi, f_lo, f_hi, last_q))


def block_thresholds(q_len: int, kv_len: int, block_q: int, block_k: int, bounds: KeyBounds | None,
                     device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(a_lo, a_hi, f_lo, f_hi)` int64 `[1|B, 1, R, 1]`: visible key blocks lie in `[a_lo, a_hi)`,
    full ones also in `[f_lo, f_hi)` (causal, window and left padding; see the module docstring)."""
    window = None if bounds is None else bounds.window
    a_lo, a_hi, f_lo, f_hi, last_q = _row_bounds(num_blocks(q_len, block_q), block_q, block_k, q_len, kv_len,
                                                 window, torch.device(device))
    if bounds is None or bounds.key_start is None:
        return a_lo, a_hi, f_lo, f_hi
    ks = bounds.key_start.to(device=device, dtype=torch.int64).view(-1, 1, 1, 1)
    return (torch.maximum(a_lo, ks // block_k), torch.where(ks <= last_q, a_hi, 0),
            torch.maximum(f_lo, -((-ks) // block_k)), f_hi)


def classify_slots(indices: torch.Tensor, counts: torch.Tensor, block_q: int, block_k: int, q_len: int,
                   kv_len: int, bounds: KeyBounds | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`(visible, full)` bool `[B, H, R, K]` for the listed slots (`< counts`) of a selection."""
    if bounds is not None and bounds.mask is not None:
        raise ValueError("a tensor mask has no full/partial split; the executor must mask every block")
    a_lo, a_hi, f_lo, f_hi = block_thresholds(q_len, kv_len, block_q, block_k, bounds, indices.device)
    idx = indices.long()
    listed = torch.arange(indices.shape[-1], device=indices.device) < counts.unsqueeze(-1)
    visible = listed & (idx >= a_lo) & (idx < a_hi)
    full = visible & (idx >= f_lo) & (idx < f_hi)
    if bounds is not None and bounds.key_valid is not None:
        b = bounds.key_valid.shape[0]
        pad = (-kv_len) % block_k
        valid = torch.nn.functional.pad(bounds.key_valid.to(indices.device), (0, pad)).view(b, -1, block_k)
        c = valid.shape[1]
        flat = idx.clamp(0, c - 1).expand(b, *idx.shape[1:]).reshape(b, -1)
        visible = visible & torch.gather(valid.any(-1), 1, flat).view(b, *idx.shape[1:])
        full = full & visible & torch.gather(valid.all(-1), 1, flat).view(b, *idx.shape[1:])
    return visible, full


def full_slots(indices: torch.Tensor, counts: torch.Tensor, block_q: int, block_k: int, q_len: int,
               kv_len: int, bounds: KeyBounds | None = None) -> torch.Tensor:
    """`[B, H, R, K]` bool: the slot is listed and its block is full (see the module docstring)."""
    return classify_slots(indices, counts, block_q, block_k, q_len, kv_len, bounds)[1]


def mask_free_prefix(indices: torch.Tensor, counts: torch.Tensor, block_q: int, block_k: int, q_len: int,
                     kv_len: int, bounds: KeyBounds | None = None) -> torch.Tensor:
    """`[B, H, R]` int32: how many leading list entries are full (the run an executor walks unmasked).
    Computed in slices of heads, so temporaries stay small next to the attention inputs."""
    b, h, r = counts.shape
    kmax = indices.shape[-1]
    out = torch.zeros(b, h, r, dtype=torch.int32, device=counts.device)
    if kmax == 0 or out.numel() == 0:
        return out
    if h > 1 and indices.stride(1) == 0 and counts.stride(1) == 0:  # shared by all heads: one head's lists
        return mask_free_prefix(indices[:, :1], counts[:, :1], block_q, block_k, q_len, kv_len,
                                bounds).expand(b, h, r).contiguous()
    step = max(1, _CHUNK // max(1, b * r * kmax))
    for h0 in range(0, h, step):
        full = full_slots(indices[:, h0:h0 + step], counts[:, h0:h0 + step], block_q, block_k, q_len, kv_len,
                          bounds)
        stop = ~full
        run = stop.to(torch.uint8).argmax(-1)
        out[:, h0:h0 + step] = torch.where(stop.any(-1), run, kmax).to(torch.int32)
    return torch.minimum(out, counts.to(torch.int32))


def compact(idx: torch.Tensor, flag: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flagged entries of each row moved to the front (order kept): `(counts int32, lists int32 [...,
    width])`. One permutation of the K slots (flagged first, the rest after them), so entries past a
    row's count hold other listed block numbers (never read by executors); zero-padded past K."""
    k = idx.shape[-1]
    inclusive = flag.cumsum(-1, dtype=torch.int64)
    slot = torch.arange(k, device=idx.device)
    pos = torch.where(flag, inclusive - 1, k - 1 - slot + inclusive)
    out = torch.empty(flag.shape, dtype=torch.int32, device=idx.device)
    out.scatter_(-1, pos, idx.to(torch.int32).expand(flag.shape))
    counts = inclusive[..., -1].to(torch.int32) if k else torch.zeros(flag.shape[:-1], dtype=torch.int32,
                                                                       device=idx.device)
    if width < k:
        out = out[..., :width].contiguous()
    elif width > k:
        out = torch.nn.functional.pad(out, (0, width - k))
    return counts, out
