"""Block-level regions every prefill method shares: where keys may be seen at all (causal, sliding
window, padding) and the regions methods force in (sinks from each row's first real token, the local
band up to the diagonal, the dense tail of the last query rows). All masks are `[B, 1, R, C]` booleans
over blocks, never over tokens."""

from __future__ import annotations

import torch

from attnpatch.sparsity.bounds import KeyBounds
from attnpatch.sparsity.selection import num_blocks


def query_block_span(q_len: int, kv_len: int, block_q: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """`[R]` absolute positions of the first and the last query of every query block (queries aligned
    to the end of the keys)."""
    r = torch.arange(num_blocks(q_len, block_q), device=device)
    offset = kv_len - q_len
    return offset + r * block_q, offset + torch.clamp((r + 1) * block_q, max=q_len) - 1


def allowed_blocks(batch: int, q_len: int, kv_len: int, block_q: int, block_k: int, bounds: KeyBounds,
                   device=None) -> torch.Tensor:
    """`[B, 1, R, C]`: key blocks holding at least one key that some query of the block may see under
    the causal rule, the sliding window and the padding (a tensor mask is clipped causally only)."""
    first_q, last_q = query_block_span(q_len, kv_len, block_q, device)
    c = torch.arange(num_blocks(kv_len, block_k), device=device)
    lo_key, hi_key = c * block_k, torch.clamp((c + 1) * block_k, max=kv_len) - 1
    ok = lo_key.view(1, -1) <= last_q.view(-1, 1)  # [R, C]
    if bounds.window is not None:
        ok &= first_q.view(-1, 1) - hi_key.view(1, -1) < bounds.window
    ok = ok.view(1, 1, *ok.shape)
    if bounds.key_start is not None:
        ok = ok & (hi_key.view(1, 1, 1, -1) >= bounds.key_start.to(device).view(-1, 1, 1, 1))
    if bounds.key_valid is not None:
        pad = num_blocks(kv_len, block_k) * block_k - kv_len
        valid = torch.nn.functional.pad(bounds.key_valid.to(device), (0, pad))
        ok = ok & valid.view(batch, 1, 1, -1, block_k).any(-1)
    return ok.expand(batch, 1, *ok.shape[2:])


def forced_blocks(batch: int, q_len: int, kv_len: int, block_q: int, block_k: int, bounds: KeyBounds,
                  sink_blocks: int, local_blocks: int, device=None) -> torch.Tensor:
    """`[B, 1, R, C]`: the sink (`sink_blocks · block_k` tokens from each row's first real token — never
    from a window's start) and the local band (`local_blocks` key blocks ending at the block of the
    query block's last token, widened to the block of its first token when a chunked-prefill offset
    misaligns them), limited to the causally reachable blocks."""
    first_q, last_q = query_block_span(q_len, kv_len, block_q, device)
    c = torch.arange(num_blocks(kv_len, block_k), device=device).view(1, 1, 1, -1)
    hi = (last_q // block_k).view(1, 1, -1, 1)
    keep = torch.zeros(1, 1, 1, 1, dtype=torch.bool, device=device)
    if local_blocks > 0:
        lo = (first_q // block_k - (local_blocks - 1)).clamp(min=0).view(1, 1, -1, 1)
        keep = keep | ((c >= lo) & (c <= hi))
    if sink_blocks > 0:
        start = bounds.first_key(batch, device).view(-1, 1, 1, 1)
        sink = (c >= start // block_k) & (c <= (start + sink_blocks * block_k - 1) // block_k)
        keep = keep | sink
    return (keep & (c <= hi)).expand(batch, 1, hi.shape[2], c.shape[-1])


def tail_blocks(q_len: int, block_q: int, tail: int, device=None) -> torch.Tensor:
    """`[1, 1, R, 1]`: the query blocks holding any of the last `tail` queries (each keeps every key
    block it may see once combined with `allowed_blocks`)."""
    rows = num_blocks(q_len, block_q)
    first = max(q_len - tail, 0) // block_q if tail > 0 else rows
    return (torch.arange(rows, device=device) >= first).view(1, 1, -1, 1)
