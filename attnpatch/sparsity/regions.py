"""Block-level regions every prefill method shares: where keys may be seen at all (causal, sliding
window, padding) and the regions methods force in (sinks from each row's first real token, the local
band up to the diagonal, the dense tail of the last query rows). All masks are `[B, 1, R, C]` booleans
over blocks, never over tokens.

The parts that depend only on lengths, block sizes and the window (the causal / window region, the local
band, the sinks of unpadded rows) are kept per shape and device (`_shape_cache`): a score-based method asks
for them once in its estimate and again in the base's selection, every layer, and each build is a dozen
small index ops — host time that showed between the GPU kernels of a 32K prefill.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from attnpatch.sparsity.bounds import KeyBounds
from attnpatch.sparsity.selection import num_blocks


def query_block_span(q_len: int, kv_len: int, block_q: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """`[R]` absolute positions of the first and the last query of every query block (queries aligned
    to the end of the keys)."""
    r = torch.arange(num_blocks(q_len, block_q), device=device)
    offset = kv_len - q_len
    return offset + r * block_q, offset + torch.clamp((r + 1) * block_q, max=q_len) - 1


_CACHE_SIZE = 16  # at 128K with 64-token blocks an entry is 4 MiB
_shape_cache: dict[tuple, torch.Tensor] = {}


def _cached(key: tuple, build: Callable[[], torch.Tensor]) -> torch.Tensor:
    """`build()`, kept under `key` (a few recent shapes). Not kept while torch.compile traces, nor under
    `torch.inference_mode` (an inference tensor could not be saved for backward by a later call). Callers
    never modify the tensor in place."""
    if torch.compiler.is_compiling() or torch.is_inference_mode_enabled():
        return build()
    hit = _shape_cache.get(key)
    if hit is None:
        if len(_shape_cache) >= _CACHE_SIZE:
            _shape_cache.pop(next(iter(_shape_cache)))
        hit = _shape_cache[key] = build()
    return hit


def _visible_region(q_len: int, kv_len: int, block_q: int, block_k: int, window: int | None, device
                    ) -> torch.Tensor:
    """`[1, 1, R, C]` the causal (and window) part of `allowed_blocks`."""
    first_q, last_q = query_block_span(q_len, kv_len, block_q, device)
    c = torch.arange(num_blocks(kv_len, block_k), device=device)
    hi_key = torch.clamp((c + 1) * block_k, max=kv_len) - 1
    ok = (c * block_k).view(1, -1) <= last_q.view(-1, 1)  # [R, C]
    if window is not None:
        ok &= first_q.view(-1, 1) - hi_key.view(1, -1) < window
    return ok.view(1, 1, *ok.shape)


def allowed_blocks(batch: int, q_len: int, kv_len: int, block_q: int, block_k: int, bounds: KeyBounds,
                   device=None) -> torch.Tensor:
    """`[B, 1, R, C]`: key blocks holding at least one key that some query of the block may see under
    the causal rule, the sliding window and the padding (a tensor mask is clipped causally only)."""
    window = None if bounds.window is None else int(bounds.window)
    ok = _cached(("visible", q_len, kv_len, block_q, block_k, window, torch.device(device or "cpu")),
                 lambda: _visible_region(q_len, kv_len, block_q, block_k, window, device))
    if bounds.has_padding:
        hi_key = torch.clamp((torch.arange(ok.shape[-1], device=device) + 1) * block_k, max=kv_len) - 1
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
    if bounds.mask is None and bounds.key_start is None and bounds.key_first is None and bounds.key_valid is None:
        # every row's first real key is key 0: the same region for every row
        keep = _cached(("forced", q_len, kv_len, block_q, block_k, sink_blocks, local_blocks,
                        torch.device(device or "cpu")),
                       lambda: _forced_region(1, q_len, kv_len, block_q, block_k, bounds, sink_blocks, local_blocks,
                                              device))
        return keep.expand(batch, *keep.shape[1:])
    return _forced_region(batch, q_len, kv_len, block_q, block_k, bounds, sink_blocks, local_blocks, device)


def _forced_region(batch: int, q_len: int, kv_len: int, block_q: int, block_k: int, bounds: KeyBounds,
                   sink_blocks: int, local_blocks: int, device) -> torch.Tensor:
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
