"""The one full/partial split of a selection: which listed key blocks (or key positions, with
`block_k = 1`) every row of their query block may see whole, so an executor can skip the mask there.

A listed block is *full* when it lies entirely inside the keys, at or below the causal diagonal of
its query block's first row, inside the sliding window of its query block's last row, and holds no
padding; every other listed block is *partial* (the executor applies the mask inside it).
"""

from __future__ import annotations

import torch

from attnpatch.sparsity.bounds import KeyBounds
from attnpatch.sparsity.regions import query_block_span

_CHUNK = 1 << 24  # list slots per slice of heads (bounds the boolean temporaries)


def full_slots(indices: torch.Tensor, counts: torch.Tensor, block_q: int, block_k: int, q_len: int,
               kv_len: int, bounds: KeyBounds | None = None) -> torch.Tensor:
    """`[B, H, R, K]` bool: the slot is listed (`< counts`) and its block is full (see the module)."""
    if bounds is not None and bounds.mask is not None:
        raise ValueError("a tensor mask has no full/partial split; the executor must mask every block")
    first_q, last_q = query_block_span(q_len, kv_len, block_q, indices.device)
    kmax = indices.shape[-1]
    idx = indices.long()
    lo_key = idx * block_k
    hi_key = lo_key + block_k - 1
    full = (torch.arange(kmax, device=indices.device) < counts.unsqueeze(-1))
    full &= (hi_key < kv_len) & (hi_key <= first_q.view(1, 1, -1, 1)) & (lo_key >= 0)
    if bounds is None:
        return full
    if bounds.window is not None:
        full &= last_q.view(1, 1, -1, 1) - lo_key < bounds.window
    if bounds.key_start is not None:
        full &= lo_key >= bounds.key_start.to(indices.device).view(-1, 1, 1, 1)
    if bounds.key_valid is not None:
        b = bounds.key_valid.shape[0]
        pad = (-kv_len) % block_k
        whole = torch.nn.functional.pad(bounds.key_valid, (0, pad)).view(b, -1, block_k).all(-1)  # [B, C]
        c = whole.shape[-1]
        full &= torch.gather(whole, 1, idx.clamp(0, c - 1).reshape(b, -1)).view(idx.shape)
    return full


def mask_free_prefix(indices: torch.Tensor, counts: torch.Tensor, block_q: int, block_k: int, q_len: int,
                     kv_len: int, bounds: KeyBounds | None = None) -> torch.Tensor:
    """`[B, H, R]` int32: how many leading list entries are full (the run an executor walks unmasked).
    Computed in slices of heads, so temporaries stay small next to the attention inputs."""
    b, h, r = counts.shape
    kmax = indices.shape[-1]
    out = torch.zeros(b, h, r, dtype=torch.int32, device=counts.device)
    if kmax == 0 or out.numel() == 0:
        return out
    if indices.stride(1) == 0 and counts.stride(1) == 0:  # shared by all heads: one head's lists
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
    """Move the flagged entries of each row to the front (order kept), pad with 0 to `width`; returns
    `(counts int32 [...], lists int32 [..., width])`."""
    counts = flag.sum(-1, dtype=torch.int32)
    pos = torch.where(flag, flag.long().cumsum(-1) - 1, width)  # unflagged -> spill column
    out = torch.zeros(*idx.shape[:-1], width + 1, dtype=torch.int32, device=idx.device)
    out.scatter_(-1, pos, torch.where(flag, idx, 0).to(torch.int32))
    return counts, out[..., :width].contiguous()
