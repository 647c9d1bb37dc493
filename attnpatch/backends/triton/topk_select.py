"""Top-k selection in ascending index order, one Triton program per row: the page lists of the
page-selecting decode methods (Quest, Recycled Attention) in one launch instead of `torch.topk` and
a sort.

Two entry points share the selection (`_select_ascending`):

* `topk_ascending_triton(scores, k)`: rows of `scores` `[R, n]` (float32; `-inf` marks entries that
  must not be chosen).
* `group_topk_ascending_triton(scores, k, first, end, combine, keep_last)`: rows of G score rows each
  (`[B, H, G, n]`, e.g. Quest's page bounds of a KV head's G query heads), combined in the kernel —
  "softmax_sum" (each row softmaxed over the valid entries, summed over G) or "max" — with the valid
  range `first[b] <= j < end[b]` and the forced entries (`first[b]` and the `keep_last + 1` last valid
  ones) applied there too, so the combine, the masks and the selection are one launch.

Selection: every score maps to an int32 with the same order (the float's bits, negatives' magnitude
bits flipped); the k-th largest is found on that integer by one of three searches (`SEARCHES`):
"radix" settles two bits per step (16 steps, each one block reduction of three in-register counts),
"radix_early" stops it once exactly k entries are at or above the bound found so far, "bitonic" takes
the smallest of `tl.topk`'s `next_pow2(k)` largest keys at position k - 1 (a bitonic top-k network in
registers, no serial steps). Then the entries above it are kept and, among those equal to it, the lowest indices until
k are kept; their indices are written in ascending order (a prefix sum gives each kept entry its
slot). Slots past the number kept (fewer than k valid entries) hold 0. Exact: the same set as
`torch.topk` up to the choice among ties.

Why: on the H200 `torch.topk` over 8192 pages took 47 µs a layer in a compiled 128K decode step
(batch 4, 32 rows: one thread block per row, whatever the batch) — the largest part of Quest's
selection after its page-bound kernel (bench/results/hf_decode_h200/quest_kernel_2026-12-04/).
Rows longer than `MAX_N` entries are declined (the caller keeps the torch path). Measured and ruled out
(twelfth session, H100, 128K: 32 and 8 rows of G = 4 × 2048 real page bounds;
bench/results/decode_layer/select_variants_h100_2026-12-05/): four bits per step (fifteen counts in one
block reduction, 8 steps at most) took 16.6 µs a call in a graph against 11.7 for two bits; 16 warps
13.7 µs against 8 warps' 11.7.

Launch: `ATTNPATCH_TOPK_CONFIG="search,warps"` (search 0 "radix", 1 "radix_early", 2 "bitonic"; e.g.
"1,4") overrides the defaults of `launch_config` for benchmarks.
"""

from __future__ import annotations

import os

import torch

from attnpatch.backends.triton.utils import (
    is_interpreted,
    on_input_device,
    per_row_bound,
    tensor_device_ok,
    triton_available,
)

__all__ = ["COMBINES", "MAX_GROUP_N", "MAX_N", "SEARCHES", "group_topk_ascending_triton", "group_unsupported_reason",
           "launch_config", "topk_ascending_triton", "unsupported_reason"]

MAX_N = 1 << 15  # entries per row held in one program's registers (512K tokens at 16-token pages)
COMBINES = ("softmax_sum", "max")  # how `group_topk_ascending_triton` combines a row's G score rows
MAX_GROUP_N = 1 << 16  # G·n entries a row of `group_topk_ascending_triton` holds in registers
SEARCHES = ("radix", "radix_early", "bitonic")  # how the k-th largest is found (index = the config's number)


def launch_config(n: int) -> tuple[int, int]:
    """`(search, num_warps)` for rows of `n` entries (`search` indexes `SEARCHES`). Measured per call in a
    graph of 8 distinct inputs (G = 4 bound rows, k = n/16, real page bounds of random keys; H100,
    bench/results/decode_layer/topk_search_h100_2026-12-06/): at n = 1024 the bitonic search with 8 warps
    took 7.6 / 7.9 µs (batch 1 / 4) against 8.4 / 9.0 for the early-exit radix search; at n = 2048 the radix
    search with 8 warps 11.3 / 11.7 against the bitonic one's best 12.4 / 12.6 (16 warps). Earlier, on the
    H200, early exit with 8 warps took 14.2 µs at n = 2048 against 17.4 for the full 16 steps with 4 warps
    (bench/results/decode_layer/)."""
    value = os.environ.get("ATTNPATCH_TOPK_CONFIG")
    if value:
        try:
            search, warps = (int(x) for x in value.split(","))
        except ValueError as e:
            raise ValueError(f"ATTNPATCH_TOPK_CONFIG must read 'search,warps' (e.g. '1,4'), got {value!r}") from e
        if not 0 <= search < len(SEARCHES) or warps not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"ATTNPATCH_TOPK_CONFIG: search must be 0..{len(SEARCHES) - 1} {SEARCHES} and warps a "
                             f"power of 2 up to 32, got {value!r}")
        return search, warps
    if n <= 1024 and not _KERNEL_INTERPRETED:  # bitonic: fewer stages the shorter the row (faster at 1024)
        return 2, (8 if n >= 512 else 4)  # (the interpreter runs tl.topk only when set before triton's import)
    return 1, (8 if n >= 1024 else 4)


if triton_available():
    import triton
    import triton.language as tl

    from attnpatch.backends.triton.combine import MAX_COMBINE as _MAX
    from attnpatch.backends.triton.combine import SUM_COMBINE as _SUM

    # tl.reduce / tl.associative_scan with the shared combine functions rather than tl.sum / tl.cumsum:
    # see backends/triton/combine.py (library @jit helpers and the CPU interpreter).

    @triton.jit
    def _add3(a0, a1, a2, b0, b1, b2):
        return a0 + b0, a1 + b1, a2 + b2

    @triton.jit
    def _select_ascending(s, valid, offs, k, out_row, count_ptr, BLOCK_K: tl.constexpr, SEARCH: tl.constexpr,
                          FUSED_COUNTS: tl.constexpr):
        """Write the ascending indices of the k largest `s` among `valid` to `out_row`, their number to
        `count_ptr` (zeros in the slots past it); return that number."""
        ok = valid.to(tl.int32)
        raw = s.to(tl.int32, bitcast=True)
        # order-preserving signed int32: negative floats have their magnitude bits flipped
        key = tl.where(raw < 0, raw ^ 0x7FFFFFFF, raw)
        if SEARCH == 2:  # bitonic: the k-th of the BLOCK_K largest keys (invalid entries below every valid one)
            top = tl.topk(tl.where(valid, key, -2147483648), BLOCK_K)
            found = tl.reduce(tl.where(tl.arange(0, BLOCK_K) == k - 1, top, 0), 0, _SUM).to(tl.int64)
        else:
            # the k-th largest key: the largest t with #(key >= t) >= k, two bits per step (thresholds stay
            # below 2^31: each step's top threshold is under the previous step's next one)
            found = tl.full([], -2147483648, tl.int64)
            cnt = tl.reduce(ok, 0, _SUM)
            stop = k if SEARCH == 1 else -1  # early exit: stop once exactly k entries are at or above `found`
            half = tl.full([], 15, tl.int64)
            while (half >= 0) & (cnt > stop):
                unit = tl.full([], 1, tl.int64) << (2 * half)
                h1 = tl.where(key >= (found + unit).to(tl.int32), ok, 0)
                h2 = tl.where(key >= (found + 2 * unit).to(tl.int32), ok, 0)
                h3 = tl.where(key >= (found + 3 * unit).to(tl.int32), ok, 0)
                if FUSED_COUNTS:  # one block reduction of three counts (GPU)
                    n1, n2, n3 = tl.reduce((h1, h2, h3), 0, _add3)
                else:  # the interpreter runs tuple reductions element by element: three fast ones
                    n1, n2, n3 = tl.reduce(h1, 0, _SUM), tl.reduce(h2, 0, _SUM), tl.reduce(h3, 0, _SUM)
                step = (n1 >= k).to(tl.int64) + (n2 >= k).to(tl.int64) + (n3 >= k).to(tl.int64)
                cnt = tl.where(step == 3, n3, tl.where(step == 2, n2, tl.where(step == 1, n1, cnt)))
                found = found + step * unit
                half = half - 1
        above = valid & (key > found)
        need = k - tl.reduce(above.to(tl.int32), 0, _SUM)
        tie = valid & (key == found)
        tie_rank = tl.associative_scan(tie.to(tl.int32), 0, _SUM)
        keep = above | (tie & (tie_rank <= need))
        slot = tl.associative_scan(keep.to(tl.int32), 0, _SUM) - 1
        kept = tl.reduce(keep.to(tl.int32), 0, _SUM)
        tl.store(out_row + slot, offs.to(tl.int32), mask=keep)
        rest = tl.arange(0, BLOCK_K)
        tl.store(out_row + rest, tl.full([BLOCK_K], 0, tl.int32), mask=(rest >= kept) & (rest < k))
        tl.store(count_ptr, kept)
        return kept

    @triton.jit
    def _group_page_scores(x, inside, valid, offs, first, end, keep_last, SOFTMAX_SUM: tl.constexpr):
        """The `[G, N]` bounds `x` (-inf outside `inside`) of a KV group combined into one score per page
        ("softmax_sum": each row softmaxed over its pages, summed; else the max), the forced pages (`first`
        and the `keep_last + 1` last valid ones) raised to the float32 maximum."""
        if SOFTMAX_SUM:  # the G rows at once: one max, one sum, one sum over the group
            top = tl.reduce(x, 1, _MAX)
            e = tl.where(inside, tl.exp(x - tl.where(top > float("-inf"), top, 0.0)[:, None]), 0.0)
            total = tl.reduce(e, 1, _SUM)
            score = tl.reduce(e / tl.where(total > 0, total, 1.0)[:, None], 0, _SUM)
        else:
            score = tl.reduce(x, 0, _MAX)
        forced = valid & ((offs == first) | ((offs < end) & (offs >= end - 1 - keep_last)))
        return tl.where(forced, 3.4028234663852886e38, score)

    @triton.jit
    def _topk_ascending_kernel(S, OUT, COUNTS, n, k, stride_s, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                               SEARCH: tl.constexpr, FUSED_COUNTS: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_N)
        s = tl.load(S + row * stride_s + offs, mask=offs < n, other=float("-inf"))
        _select_ascending(s, s > float("-inf"), offs, k, OUT + row * k, COUNTS + row, BLOCK_K, SEARCH,
                          FUSED_COUNTS)

    @triton.jit
    def _group_topk_kernel(
        S, FIRST, END, OUT, COUNTS, FLAG, heads, group, n, k, keep_last,
        stride_sb, stride_sh, stride_sg, stride_first, stride_end,
        SOFTMAX_SUM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        SEARCH: tl.constexpr, FUSED_COUNTS: tl.constexpr, HAS_FLAG: tl.constexpr,
    ):  # fmt: skip
        if HAS_FLAG:  # noqa: SIM108  (constexpr branch kept explicit)
            go = tl.load(FLAG)
        else:
            go = 1
        if go != 0:
            row = tl.program_id(0).to(tl.int64)
            b = row // heads
            offs = tl.arange(0, BLOCK_N)
            first = tl.load(FIRST + b * stride_first).to(tl.int32)
            end = tl.load(END + b * stride_end).to(tl.int32)
            valid = (offs < n) & (offs >= first) & (offs < end)
            offs_g = tl.arange(0, BLOCK_G)
            inside = (offs_g < group)[:, None] & valid[None, :]
            x = tl.load(S + b * stride_sb + (row % heads) * stride_sh + offs_g[:, None] * stride_sg + offs[None, :],
                        mask=inside, other=float("-inf")).to(tl.float32)
            s = _group_page_scores(x, inside, valid, offs, first, end, keep_last, SOFTMAX_SUM)
            _select_ascending(s, valid, offs, k, OUT + row * k, COUNTS + row, BLOCK_K, SEARCH,
                              FUSED_COUNTS)

    _KERNEL_INTERPRETED = is_interpreted(_topk_ascending_kernel)
else:
    _KERNEL_INTERPRETED = False


def unsupported_reason(scores: torch.Tensor, k: int) -> str | None:
    """Why the kernels cannot select from `scores` (None when they can): the caller runs torch.topk."""
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


def group_unsupported_reason(scores: torch.Tensor, k: int) -> str | None:
    """Why `group_topk_ascending_triton` cannot take `scores` `[B, H, G, n]` (None when it can)."""
    if scores.dim() != 4:
        return f"scores of shape {tuple(scores.shape)} (need [B, H, G, n])"
    reason = unsupported_reason(scores, k)
    if (reason is None
            and triton.next_power_of_2(scores.shape[2]) * triton.next_power_of_2(scores.shape[3]) > MAX_GROUP_N):
        reason = f"G·n = {scores.shape[2]}·{scores.shape[3]} score entries per row (at most {MAX_GROUP_N}, powers of 2)"
    return reason


def _outputs(rows: int, k: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty(rows, k, dtype=torch.int32, device=device),
            torch.empty(rows, dtype=torch.int32, device=device))


def _block_sizes(n: int, k: int) -> tuple[int, int]:
    return max(16, triton.next_power_of_2(n)), max(16, triton.next_power_of_2(k))


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
    out, counts = _outputs(flat.shape[0], k, scores.device)
    if flat.shape[0]:
        block_n, block_k = _block_sizes(n, k)
        search, warps = launch_config(n)
        _topk_ascending_kernel[(flat.shape[0],)](flat, out, counts, n, k, flat.stride(0), BLOCK_N=block_n,
                                                 BLOCK_K=block_k, SEARCH=search, FUSED_COUNTS=not _KERNEL_INTERPRETED,
                                                 num_warps=warps)
    return out.view(*lead, k), counts.view(lead)


@on_input_device
def group_topk_ascending_triton(scores: torch.Tensor, k: int, first: torch.Tensor | int, end: torch.Tensor | int,
                                combine: str = "softmax_sum", keep_last: int = 0,
                                flag: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`(indices [B, H, k], counts [B, H])` int32: per (b, h) the k best entries `j` of
    `combine(scores[b, h, :, j])` (`scores` `[B, H, G, n]` float32) among `first[b] <= j < end[b]`
    (`first`, `end`: `[B]`, 0-dim or int), `first[b]` and the `keep_last + 1` last valid entries
    always in, in ascending order (zeros past `counts`). `combine`: "softmax_sum" (each of the G rows
    softmaxed over the valid entries, then summed) or "max" (the largest of the G). `flag` (1-element int
    tensor on the device, optional): when it reads 0 the kernel returns at once and both outputs are left
    unwritten (a compiled step that needs the selection only on some steps discards them with `torch.where`)."""
    if combine not in COMBINES:
        raise ValueError(f"group_topk_ascending_triton: combine must be one of {COMBINES}, got {combine!r}")
    reason = group_unsupported_reason(scores, k)
    if reason is not None:
        raise ValueError(f"group_topk_ascending_triton: {reason}")
    if scores.stride(-1) != 1:
        scores = scores.contiguous()
    b, h, g, n = scores.shape
    first_t, stride_first = per_row_bound(first, b, scores.device, "group_topk_ascending_triton")
    end_t, stride_end = per_row_bound(end, b, scores.device, "group_topk_ascending_triton")
    out, counts = _outputs(b * h, k, scores.device)
    if b * h:
        block_n, block_k = _block_sizes(n, k)
        search, warps = launch_config(n)
        _group_topk_kernel[(b * h,)](
            scores, first_t, end_t, out, counts, flag if flag is not None else counts, h, g, n, k, int(keep_last),
            scores.stride(0), scores.stride(1), scores.stride(2), stride_first, stride_end,
            SOFTMAX_SUM=combine == "softmax_sum", BLOCK_G=triton.next_power_of_2(g), BLOCK_N=block_n, BLOCK_K=block_k,
            SEARCH=search, FUSED_COUNTS=not _KERNEL_INTERPRETED, HAS_FLAG=flag is not None, num_warps=warps,
        )  # fmt: skip
    return out.view(b, h, k), counts.view(b, h)
