"""One-launch Triton version of `attnpatch.backends.flash.selection_to_block_sparse`'s list building.

Same output, element for element, as the PyTorch path (`flash._torch_lists`): one program per output
(batch, head, query block) row loads the row's K selection slots, classifies each as FULL / PARTIAL /
dropped against per-row thresholds on the key-block index (computed in the program from the row's
query positions, the window and `key_start[b]`), and writes the two compacted lists as one
permutation of the K slots (kept entries first, ascending; the others after them), so every output
entry is written once and no fill is needed. At low density the PyTorch path is ~25 small launches
(host-bound, ~0.1-0.2 ms); this is one.
"""

from __future__ import annotations

import contextlib

import torch

from attnpatch.backends.triton.utils import is_interpreted, tensor_device_ok, triton_available
from attnpatch.sparsity import num_blocks

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _add_fallback(a, b):
        return a + b

    # The combine function `tl.sum` / `tl.cumsum` use: same code on the GPU, and the interpreter
    # recognises it even when triton was imported before TRITON_INTERPRET was set.
    _ADD = getattr(tl.standard, "_sum_combine", _add_fallback)

    @triton.jit
    def _flash_lists_kernel(
        Idx, Cnt, KeyStart,
        MaskCnt, MaskIdx, FullCnt, FullIdx,
        s_ib, s_ih, s_ir, s_ik, s_cb, s_ch, s_cr,
        H, R, K, W,
        block_q, block_k, q_len, kv_len, n_kb, window,
        HAS_WINDOW: tl.constexpr, HAS_KEY_START: tl.constexpr, K_PAD: tl.constexpr,
    ):
        row = tl.program_id(0)
        r = row % R
        bh = row // R
        h = bh % H
        b = bh // H
        off = kv_len - q_len
        first_q = r * block_q + off
        last_q = tl.minimum((r + 1) * block_q, q_len) - 1 + off
        # visible blocks: [a_lo, a_hi); full blocks: [f_lo, f_hi) (see attnpatch.sparsity.split)
        a_hi = tl.minimum(last_q // block_k + 1, n_kb)
        f_hi = (first_q + 1) // block_k
        a_lo = first_q * 0
        f_lo = first_q * 0
        if HAS_WINDOW:
            # clamp before dividing: Triton's // truncates toward zero
            a_lo = tl.maximum(first_q - window + 1, 0) // block_k
            f_lo = (tl.maximum(last_q - window + 1, 0) + block_k - 1) // block_k
        if HAS_KEY_START:
            ks = tl.maximum(tl.load(KeyStart + b), 0)
            a_lo = tl.maximum(a_lo, ks // block_k)  # the block holding key ks onwards
            a_hi = tl.where(ks <= last_q, a_hi, 0)  # the last row must reach a real key (so ks < Lk)
            f_lo = tl.maximum(f_lo, (ks + block_k - 1) // block_k)

        slot = tl.arange(0, K_PAD)
        in_row = slot < K
        idx = tl.load(Idx + b.to(tl.int64) * s_ib + h * s_ih + r * s_ir + slot * s_ik, mask=in_row, other=0)
        cnt = tl.load(Cnt + b.to(tl.int64) * s_cb + h * s_ch + r * s_cr)
        visible = in_row & (slot < cnt) & (idx >= a_lo) & (idx < a_hi)
        full = visible & (idx >= f_lo) & (idx < f_hi)
        partial = visible & ((idx < f_lo) | (idx >= f_hi))
        out_row = row.to(tl.int64) * W
        for which in tl.static_range(2):
            if which == 0:
                flag = full
                list_ptr = FullIdx
                cnt_ptr = FullCnt
            else:
                flag = partial
                list_ptr = MaskIdx
                cnt_ptr = MaskCnt
            inclusive = tl.associative_scan(flag.to(tl.int32), 0, _ADD)
            pos = tl.where(flag, inclusive - 1, K - 1 - slot + inclusive)
            tl.store(list_ptr + out_row + pos, idx.to(tl.int32), mask=in_row & (pos < W))
            tl.store(cnt_ptr + row, tl.reduce(flag.to(tl.int32), 0, _ADD))

    _KERNEL_INTERPRETED = is_interpreted(_flash_lists_kernel)
else:
    _KERNEL_INTERPRETED = False


def can_run(indices: torch.Tensor) -> bool:
    """Whether the kernel can build lists for selection tensors on `indices`' device."""
    return triton_available() and tensor_device_ok(indices, _KERNEL_INTERPRETED)


def build_lists(indices, counts, key_start, window, block_q, block_k, q_len, kv_len, out_batch, width):
    """(mask_cnt, mask_idx, full_cnt, full_idx) for `indices` `[B|1, H', R, K]` / `counts`; rows of
    batch `b` read selection row `min(b, B_sel - 1)` (a batch-shared selection is stride 0)."""
    _, heads, rows, k = indices.shape
    if indices.shape[0] != out_batch:
        indices = indices.expand(out_batch, -1, -1, -1)
        counts = counts.expand(out_batch, -1, -1)
    device = indices.device
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        mask_cnt = torch.empty(out_batch, heads, rows, dtype=torch.int32, device=device)
        full_cnt = torch.empty_like(mask_cnt)
        mask_idx = torch.empty(out_batch, heads, rows, width, dtype=torch.int32, device=device)
        full_idx = torch.empty_like(mask_idx)
        ks = key_start if key_start is not None else mask_cnt  # dummy pointer when unused
        k_pad = max(16, triton.next_power_of_2(k))
        _flash_lists_kernel[(out_batch * heads * rows,)](
            indices, counts, ks, mask_cnt, mask_idx, full_cnt, full_idx,
            *indices.stride(), *counts.stride(),
            heads, rows, k, width,
            block_q, block_k, q_len, kv_len, num_blocks(kv_len, block_k), window if window is not None else 0,
            HAS_WINDOW=window is not None, HAS_KEY_START=key_start is not None, K_PAD=k_pad,
            num_warps=4 if k_pad >= 512 else (2 if k_pad >= 128 else 1),
        )
    return mask_cnt, mask_idx, full_cnt, full_idx

