"""Top-k selection in ascending index order, one Triton program per row: the page lists of the
page-selecting decode methods (Quest, Recycled Attention) in one launch instead of `torch.topk` and
a sort.

For each row of `scores` `[R, n]` (float32; `-inf` marks entries that must not be chosen) the kernel
keeps the row in registers, maps every score to an int32 with the same order (the float's bits,
negatives' magnitude bits flipped), finds the k-th largest by a search on that integer that settles
two bits per step (16 steps, each one block reduction of three in-register counts), then keeps the entries above it and, among those equal to it, the
lowest indices until k are kept, and writes their indices in ascending order (a prefix sum gives
each kept entry its slot). Slots past the number kept (fewer than k entries above `-inf`) hold 0.
Exact: the same set as `torch.topk` up to the choice among ties.

Why: on the H200 `torch.topk` over 8192 pages took 47 µs a layer in a compiled 128K decode step
(batch 4, 32 rows: one thread block per row, whatever the batch) — the largest part of Quest's
selection after its page-bound kernel (bench/results/hf_decode_h200/quest_kernel_2026-12-04/).
Rows longer than `MAX_N` entries are declined (the caller keeps the torch path).
"""

from __future__ import annotations

import torch

from attnpatch.backends.triton.utils import (
    is_interpreted,
    on_input_device,
    tensor_device_ok,
    triton_available,
)

__all__ = ["MAX_N", "topk_ascending_triton", "unsupported_reason"]

MAX_N = 1 << 15  # entries per row held in one program's registers (512K tokens at 16-token pages)


if triton_available():
    import triton
    import triton.language as tl

    # tl.reduce / tl.associative_scan with local combine functions rather than tl.sum / tl.cumsum:
    # see the note in backends/triton/decode.py (library @jit helpers and the CPU interpreter).
    @triton.jit
    def _add(a, b):
        return a + b

    @triton.jit
    def _add3(a0, a1, a2, b0, b1, b2):
        return a0 + b0, a1 + b1, a2 + b2

    @triton.jit
    def _topk_ascending_kernel(S, OUT, COUNTS, n, k, stride_s, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_N)
        s = tl.load(S + row * stride_s + offs, mask=offs < n, other=float("-inf"))
        ok = (s > float("-inf")).to(tl.int32)
        bits = s.to(tl.int32, bitcast=True)
        # order-preserving signed int32: negative floats have their magnitude bits flipped
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
        # the k-th largest key: the largest t with #(key >= t) >= k, two bits per step (16 block reductions)
        found = tl.full([], -2147483648, tl.int64)
        for half in tl.static_range(15, -1, -1):
            unit = 1 << (2 * half)
            c1 = (found + unit).to(tl.int32)
            c2 = (found + 2 * unit).to(tl.int32)
            c3 = (found + 3 * unit).to(tl.int32)
            n1, n2, n3 = tl.reduce((tl.where(key >= c1, ok, 0), tl.where(key >= c2, ok, 0),
                                    tl.where(key >= c3, ok, 0)), 0, _add3)
            step = (n1 >= k).to(tl.int64) + (n2 >= k).to(tl.int64) + (n3 >= k).to(tl.int64)
            found = found + step * unit
        top = found.to(tl.int32)
        valid = ok != 0
        above = valid & (key > top)
        need = k - tl.reduce(above.to(tl.int32), 0, _add)
        tie = valid & (key == top)
        tie_rank = tl.associative_scan(tie.to(tl.int32), 0, _add)
        keep = above | (tie & (tie_rank <= need))
        slot = tl.associative_scan(keep.to(tl.int32), 0, _add) - 1
        kept = tl.reduce(keep.to(tl.int32), 0, _add)
        tl.store(OUT + row * k + slot, offs.to(tl.int32), mask=keep)
        rest = tl.arange(0, BLOCK_K)
        tl.store(OUT + row * k + rest, tl.full([BLOCK_K], 0, tl.int32), mask=(rest >= kept) & (rest < k))
        tl.store(COUNTS + row, kept)

    _KERNEL_INTERPRETED = is_interpreted(_topk_ascending_kernel)
else:
    _KERNEL_INTERPRETED = False


def unsupported_reason(scores: torch.Tensor, k: int) -> str | None:
    """Why the kernel cannot select from `scores` (None when it can): the caller runs torch.topk."""
    if not triton_available():
        return "triton is not installed"
    if not tensor_device_ok(scores, _KERNEL_INTERPRETED):
        return f"device {scores.device} (need CUDA, or CPU with TRITON_INTERPRET=1 set before import)"
    if scores.dtype != torch.float32:
        return f"scores of dtype {scores.dtype} (float32 needed)"
    n = scores.shape[-1]
    if n > MAX_N:
        return f"{n} entries per row (at most {MAX_N})"
    if not 1 <= k <= n:
        return f"k = {k} outside 1..{n}"
    return None


@on_input_device
def topk_ascending_triton(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(indices, counts)`: int32 `[..., k]` ascending indices of the k largest entries of each row of
    `scores` `[..., n]` among those above -inf (zeros past `counts`), and int32 `[...]` how many."""
    reason = unsupported_reason(scores, k)
    if reason is not None:
        raise ValueError(f"topk_ascending_triton: {reason}")
    lead, n = scores.shape[:-1], scores.shape[-1]
    flat = scores.reshape(-1, n)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    rows = flat.shape[0]
    out = torch.empty(rows, k, dtype=torch.int32, device=scores.device)
    counts = torch.empty(rows, dtype=torch.int32, device=scores.device)
    if rows:
        block = max(16, triton.next_power_of_2(n))
        _topk_ascending_kernel[(rows,)](flat, out, counts, n, k, flat.stride(0), BLOCK_N=block,
                                        BLOCK_K=max(16, triton.next_power_of_2(k)), num_warps=8 if block >= 4096 else 4)
    return out.view(*lead, k), counts.view(lead)
