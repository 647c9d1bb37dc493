"""Which keys a query may see besides the causal rule: padding and sliding windows, in closed form."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Elements per chunk when checking a tensor mask against the closed form (bounds temporaries to ~64 MiB).
_MASK_CHECK_ELEMS = 1 << 26


@dataclass(frozen=True)
class KeyBounds:
    """Key visibility beyond causality, for queries aligned to the end of the keys (query `i` of a call
    with `Lq` queries and `Lk` keys sits at position `p = Lk - Lq + i`).

    Key `j` is visible to that query iff `j <= p` and:
    * `j >= key_start[b]` (left padding; None: no padding),
    * `key_valid[b, j]` (padding that is not left padding; None: none),
    * `p - j < window` (sliding window; None: full attention),
    * `mask[b, 0|h, i, j]` when `mask` is set: an arbitrary boolean mask that is not of this form
      (then only executors that read tensors take the call; `window`, when also set, only tells
      methods which blocks are worth visiting — the mask decides). `causal=False` says that mask
      lets some query see a later key (a multimodal prompt's image tokens): no sparse method or
      executor takes such a call (they all apply the causal rule), it runs dense.

    `key_end` (`[B]` int, set with `key_valid` for a decode step) is one past the last valid key of
    each row: with a static cache the keys are the whole preallocated buffer and the slots from
    `key_end` on are not written yet. It only bounds what is worth reading (decode page lists are
    clipped to it on device); visibility is decided by the fields above. `key_first` (`[B]`, likewise)
    is each row's first valid key, what `first_key` returns (computed once per decode step, not per layer).
    """

    key_start: torch.Tensor | None = None  # [B] int
    window: int | None = None
    key_valid: torch.Tensor | None = None  # [B, Lk] bool
    mask: torch.Tensor | None = None  # [B, 1|H, Lq, Lk] bool
    causal: bool = True  # False: the tensor mask lets some query see a later key (e.g. image tokens)
    key_end: torch.Tensor | None = None  # [B] int: one past each row's last valid key (informative)
    key_first: torch.Tensor | None = None  # [B] int: each row's first valid key (set with key_valid: `first_key`)

    @property
    def is_plain(self) -> bool:
        """Causal only: no padding, no window, no tensor mask."""
        return self.key_start is None and self.window is None and self.key_valid is None and self.mask is None

    @property
    def has_padding(self) -> bool:
        return self.key_start is not None or self.key_valid is not None

    def first_key(self, batch: int, device) -> torch.Tensor:
        """`[B]` each row's first real (non-padding) key — never the start of a sliding window."""
        if self.key_start is not None:
            return self.key_start.to(device=device, dtype=torch.long)
        if self.key_first is not None:
            return self.key_first.to(device=device, dtype=torch.long)
        if self.key_valid is not None:
            return self.key_valid.to(torch.int8).argmax(-1).to(device)
        if self.mask is not None:  # a key no query may see is padding
            return self.mask.any(dim=(1, 2)).to(torch.int8).argmax(-1).to(device)
        return torch.zeros(batch, dtype=torch.long, device=device)

    def visible(self, qpos: torch.Tensor, kpos: torch.Tensor, batch: int) -> torch.Tensor:
        """Boolean visibility for absolute query positions `qpos` and key positions `kpos` that broadcast
        against each other with a leading batch dimension of 1 or `batch` (closed form only)."""
        if self.mask is not None:
            raise ValueError("a tensor mask has no closed form; index it directly")
        ok = kpos <= qpos
        if self.window is not None:
            ok = ok & (qpos - kpos < self.window)
        if self.key_start is not None:
            shape = (batch,) + (1,) * (max(ok.dim(), kpos.dim()) - 1)
            ok = ok & (kpos >= self.key_start.to(kpos.device).view(shape))
        if self.key_valid is not None:
            lk = self.key_valid.shape[-1]
            idx = kpos.clamp(0, lk - 1)
            flat = idx.expand(*torch.broadcast_shapes(idx.shape, (batch,) + (1,) * (idx.dim() - 1)))
            valid = torch.gather(self.key_valid.to(kpos.device).view(batch, -1), 1, flat.reshape(batch, -1))
            ok = ok & valid.view(flat.shape)
        return ok

    def decode_visible(self, batch: int, kv_len: int, device=None) -> torch.Tensor:
        """`[B, kv_len]` bool: the keys a decode query (position `kv_len - 1`) may see."""
        if self.mask is not None:
            return self.mask[:, 0, -1, :].to(device).expand(batch, kv_len)
        kpos = torch.arange(kv_len, device=device).view(1, kv_len)
        return self.visible(torch.tensor(kv_len - 1, device=device), kpos, batch).expand(batch, kv_len)

    def rows_mask(self, batch: int, q_len: int, kv_len: int, rows: tuple[int, int], keys: tuple[int, int],
                  device=None) -> torch.Tensor:
        """`[B, r1 - r0, k1 - k0]`: which keys k0..k1 (those past `kv_len`: none) queries r0..r1 (of `q_len`)
        see — a window of `dense_mask` without its O(Lq · Lk) whole."""
        (r0, r1), (k0, k1) = rows, keys
        if self.mask is not None:
            part = torch.nn.functional.pad(self.mask[:, 0, r0:r1], (0, max(0, k1 - kv_len)), value=False)
            return part[..., k0:k1].to(device).expand(batch, r1 - r0, k1 - k0)
        qpos = (torch.arange(r0, r1, device=device) + kv_len - q_len).view(1, -1, 1)
        kpos = torch.arange(k0, k1, device=device).view(1, 1, -1)
        return self.visible(qpos, kpos, batch).expand(batch, r1 - r0, k1 - k0)

    def dense_mask(self, batch: int, q_len: int, kv_len: int, device=None) -> torch.Tensor:
        """The boolean `[B, 1, Lq, Lk]` mask these bounds describe (tests and small inputs: O(Lq·Lk))."""
        if self.mask is not None:
            return self.mask
        qpos = (torch.arange(q_len, device=device) + kv_len - q_len).view(1, 1, q_len, 1)
        kpos = torch.arange(kv_len, device=device).view(1, 1, 1, kv_len)
        return self.visible(qpos, kpos, batch).expand(batch, 1, q_len, kv_len)



def valid_key_end(key_valid: torch.Tensor) -> torch.Tensor:
    """`[B]` int64 one past the last True of `key_valid` `[B, L]` (0 for a row with none), on device, no sync."""
    ends = torch.arange(1, key_valid.shape[-1] + 1, device=key_valid.device)
    return torch.where(key_valid, ends, 0).amax(-1)


def sees_later_keys(mask: torch.Tensor, q_len: int, kv_len: int) -> bool:
    """Whether a boolean mask `[B, 1|H, q_len, kv_len]` lets some query see a key after its own
    position (queries aligned to the end of the keys); row chunks, no Lq×Lk temporary, one sync."""
    offset = kv_len - q_len
    kv = torch.arange(kv_len, device=mask.device)
    later = torch.zeros((), dtype=torch.bool, device=mask.device)
    rows = max(1, _MASK_CHECK_ELEMS // max(1, mask.shape[0] * mask.shape[1] * kv_len))
    for r0 in range(0, q_len, rows):
        r1 = min(q_len, r0 + rows)
        future = kv > torch.arange(r0, r1, device=mask.device).unsqueeze(-1) + offset
        later |= (mask[:, :, r0:r1, :] & future).any()
    return bool(later)


def padding_key_validity(mask: torch.Tensor, q_len: int, kv_len: int, check: bool = True) -> torch.Tensor:
    """Per-key validity `[B, kv_len]` of a boolean tensor mask `[B, 1, q_len, kv_len]` of the form
    "causal AND key_valid[b, kv]", or ValueError for any other mask.

    `key_valid` is the last query row, which sees every key under the causal rule. With `check` the
    mask is compared with that form on every causally visible position (row chunks, no Lq×Lk
    temporary, one host sync); positions above the diagonal are ignored (the causal rule removes
    them anyway).
    """
    if mask.dtype != torch.bool:
        raise ValueError(f"only boolean masks are taken in closed form, got dtype {mask.dtype}")
    if mask.dim() != 4 or mask.shape[1] != 1 or tuple(mask.shape[2:]) != (q_len, kv_len):
        raise ValueError(f"mask must be [B, 1, {q_len}, {kv_len}], got {tuple(mask.shape)}")
    key_valid = mask[:, 0, -1, :]
    if check and q_len > 0:
        offset = kv_len - q_len
        kv = torch.arange(kv_len, device=mask.device)
        bad = torch.zeros((), dtype=torch.bool, device=mask.device)
        rows = max(1, _MASK_CHECK_ELEMS // max(1, mask.shape[0] * kv_len))
        for r0 in range(0, q_len, rows):
            r1 = min(q_len, r0 + rows)
            visible = kv <= torch.arange(r0, r1, device=mask.device).unsqueeze(-1) + offset
            differs = mask[:, 0, r0:r1, :] != key_valid.unsqueeze(1)
            bad |= (differs & visible).any()
        if bool(bad):
            raise ValueError("mask is not of the form causal AND key_valid[b, kv] (left/right padding)")
    return key_valid.contiguous()
