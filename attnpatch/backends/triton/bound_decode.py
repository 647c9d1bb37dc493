"""A page-bound decode step in one launch: each KV head's page bounds, its top pages and the split-KV
attention over them in one cooperative Triton kernel (Quest's step at batch 1, where launches and the
gaps between them are a third of the step).

The separate path is three kernels and a merge: `page_upper_bounds_triton` (bounds `[B, Hkv, G, n]`),
`group_topk_ascending_triton` (combine, masks, top-k in ascending order) and `sparse_decode_attention`
(split kernel + merge). This kernel runs the same arithmetic with grid `(B·Hkv, S)`:

1. **Bounds**: program `(bh, s)` bounds pages `[s·P, (s+1)·P)` of its KV head (`tl.dot` of the G query
   rows' positive / negative parts with the page max / min rows, float32 accumulation) into a float32
   scratch `[B·Hkv, G, n]`.
2. **Head barrier**: the S programs of a KV head wait for each other (an atomic counter per head). The
   launch is cooperative (`launch_cooperative_grid`): CUDA refuses it unless every program is resident at
   once, so the wait cannot deadlock; S is chosen so that `B·Hkv·S` programs fit one per SM.
3. **Selection**: every program of the head reads the head's G bound rows (L2) and selects the same `k`
   pages as the group top-k kernel (`topk_select._select_ascending`: same combine, masks, forced pages and
   tie rule) into its own list row — redundant, but no second barrier.
4. **Attention**: program `s` reads tiles `[s·c, (s+1)·c)` of the list (`decode._tile_scores` /
   `_accumulate`, the split kernel's code) and writes its partial `(m, l, acc)`.
5. **Merge**: the last program of the head to finish (a second counter) merges the S partials by
   log-sum-exp and writes the output; it resets both counters for the next call.

The counters (int32, two per KV head row) are the caller's: a Quest cache layer makes them with its page tables
(`attnpatch.cache.pages.barrier_counters`) and each call leaves them at zero. A buffer made on the first call
inside a compiled step would come from inductor's CUDA-graph pool, which refuses it ("tensor(s) in the
cudagraph pool not tracked as outputs", measured on an H100); direct callers without counters share a per-device
buffer made on their first call. Two launches sharing counters on different streams at once would race, so the
kernel is for one stream (a model's forward).
Under Triton's CPU interpreter programs run one after another, so the barrier cannot work there: the same
kernel runs in two launches (bounds, then the rest), and the tests compare that with the separate path.

Measured (H200, 128K, Llama-3.1-8B shape: 32 q / 8 KV heads, d 128, budget 1/16, per call with a cold L2;
bench/results/decode_layer/one_launch_h200_2026-12-06/): at batch 1 (8 rows of `B·Hkv`) the step takes 27.0 µs at
128-token pages and 32.3 at 64 with 3 stages, against 30.0 / 34.0 for the separate kernels and 125.7 for cuDNN (4.7× /
3.9×); at batch 4 (32 rows) it is slower: 65.8 / 121.4 against 57.2 / 66.2 µs (2 stages; each program selects over all
of its head's pages, and 4 programs per head read the tiles). So the rule "auto" (the default, `DEFAULT_MODE`) takes
it where `B·Hkv <= MAX_ROWS` (`mode`). Issue 12's 8× at batch 1 (<= 15.7 µs on that card) stays out of reach: the
decode kernel alone over the selected pages takes 17.0 µs there.
Compiled ahead of time for sm_90 on a CPU machine (Triton 3.9, its ptxas;
tests/test_bound_decode_sm90_compile.py) at that shape, 4 warps, 128-token pages: 36.9 KB of shared memory,
255 registers and 232 B of stack (the split kernel alone: 41.0 KB, 255 registers, 192 B), so one program
per SM fits.
"""

from __future__ import annotations

import os

import torch

from attnpatch.backends.decode_plan import ALLOWED_HEAD_DIMS, ALLOWED_PAGE_SIZES, _sm_count, default_tile_size
from attnpatch.backends.triton.topk_select import COMBINES
from attnpatch.backends.triton.utils import (
    fp32_tiles_reason,
    is_interpreted,
    on_input_device,
    per_row_bound,
    tensor_device_ok,
    triton_available,
    with_contiguous_last_dim,
)

__all__ = ["bound_decode_attention", "choose_splits", "few_programs_reason", "launch_config", "mode",
           "too_many_rows_reason", "unsupported_reason"]

# Fewer programs per KV head than this (many rows: B·Hkv above a quarter of the SMs) and the separate kernels,
# whose split kernel runs two waves of programs, spread the reads wider: the backend keeps them (reasoned; the
# measured rule is MAX_ROWS).
MIN_SPLITS = 4
# The most `B·Hkv` rows the backend gives this kernel by default: at 8 rows it measured faster than the separate
# kernels, at 32 slower (the module docstring's figures); rows in between are not measured.
MAX_ROWS = 8
# "auto" since the compiled HF step with the cache layer's counters passed on a GPU (twenty-sixth session, H100:
# tests/gpu/test_decode_compile_cuda.py, where a reduce-overhead Quest step traces `attnpatch::bound_decode` and gives
# the eager logits at batch 1 and 2). End to end the gain is within noise where the step is weight-bound: 8.062 ms
# a token at 128K, batch 1 (32-layer 8B shape, H100) against 8.070 ms with the separate kernels the session before.
DEFAULT_MODE = "auto"
MAX_PAGES = 1 << 12  # the pages one program's selection holds in registers
_LOG2E = 1.4426950408889634

if triton_available():
    import triton
    import triton.language as tl

    from attnpatch.backends.triton.combine import MAX_COMBINE as _MAX
    from attnpatch.backends.triton.combine import SUM_COMBINE as _SUM
    from attnpatch.backends.triton.decode import _accumulate, _load_query_rows, _tile_scores
    from attnpatch.backends.triton.topk_select import _group_page_scores, _select_ascending
    from attnpatch.backends.triton.topk_select import launch_config as _topk_launch

    @triton.jit
    def _bound_decode_kernel(
        Q, K, V, PMIN, PMAX, FIRST, END, BOUNDS, LISTS, COUNTS, WS, SEM, Out, KeyStart, KeyValid,
        stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
        stride_lb, stride_lh, stride_ln, stride_ub, stride_uh, stride_un, stride_first, stride_end,
        stride_ob, stride_oh, stride_valid_b,
        n_kv_heads, group, kv_len, n_pages, k, keep_last, num_splits, ws_rows, bound_scale, qk_scale,
        PAGE: tl.constexpr, TILE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_GC: tl.constexpr,
        HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr, SOFTMAX_SUM: tl.constexpr, SEARCH: tl.constexpr,
        FUSED_COUNTS: tl.constexpr, PHASE: tl.constexpr, DOT_PRECISION: tl.constexpr,
        HAS_KEY_START: tl.constexpr, HAS_KEY_VALID: tl.constexpr,
    ):  # fmt: skip
        # PHASE 0: the whole step (cooperative launch); 1: bounds only; 2: the rest (interpreter).
        pid_bh = tl.program_id(0)
        split = tl.program_id(1)
        n_bh = tl.num_programs(0)
        b = (pid_bh // n_kv_heads).to(tl.int64)
        hk = (pid_bh % n_kv_heads).to(tl.int64)
        offs_g = tl.arange(0, BLOCK_G)
        g_ok = offs_g < group
        q = _load_query_rows(Q, b, hk, stride_qb, stride_qh, group, BLOCK_G, HEAD_D)
        head_bounds = BOUNDS + pid_bh.to(tl.int64) * group * n_pages

        if PHASE != 2:  # 1. this program's share of the head's page bounds
            offs_p = split * BLOCK_P + tl.arange(0, BLOCK_P)
            p_ok = offs_p < n_pages
            rows_p = offs_p.to(tl.int64)[:, None]
            offs_d = tl.arange(0, HEAD_D)[None, :]
            hi = tl.load(PMAX + b * stride_ub + hk * stride_uh + rows_p * stride_un + offs_d, mask=p_ok[:, None],
                         other=0.0)
            lo = tl.load(PMIN + b * stride_lb + hk * stride_lh + rows_p * stride_ln + offs_d, mask=p_ok[:, None],
                         other=0.0)
            pos = tl.where(q > 0, q, 0.0).to(hi.dtype)
            neg = tl.where(q < 0, q, 0.0).to(lo.dtype)
            bound = tl.dot(pos, tl.trans(hi), input_precision=DOT_PRECISION)
            bound += tl.dot(neg, tl.trans(lo), input_precision=DOT_PRECISION)
            tl.store(head_bounds + offs_g.to(tl.int64)[:, None] * n_pages + offs_p[None, :], bound * bound_scale,
                     mask=g_ok[:, None] & p_ok[None, :])

        if PHASE == 0:  # 2. wait for the head's other programs (resident: cooperative launch)
            tl.debug_barrier()
            now = tl.atomic_add(SEM + pid_bh, 1, sem="release") + 1
            while now < num_splits:
                now = tl.atomic_add(SEM + pid_bh, 0, sem="acquire")
            tl.debug_barrier()

        if PHASE != 1:
            # 3. the head's selection, as the group top-k kernel makes it
            first = tl.load(FIRST + b * stride_first).to(tl.int32)
            end = tl.load(END + b * stride_end).to(tl.int32)
            offs = tl.arange(0, BLOCK_N)
            valid = (offs < n_pages) & (offs >= first) & (offs < end)
            offs_gc = tl.arange(0, BLOCK_GC)
            inside = (offs_gc < group)[:, None] & valid[None, :]
            x = tl.load(head_bounds + offs_gc.to(tl.int64)[:, None] * n_pages + offs[None, :], mask=inside,
                        other=float("-inf"), cache_modifier=".cg")
            s = _group_page_scores(x, inside, valid, offs, first, end, keep_last, SOFTMAX_SUM)
            list_row = (pid_bh * num_splits + split).to(tl.int64)
            idx_row = LISTS + list_row * k
            n_sel = _select_ascending(s, valid, offs, k, idx_row, COUNTS + list_row, BLOCK_K, SEARCH, FUSED_COUNTS)
            tl.debug_barrier()  # the list written by every thread, before any reads it

            # 4. this program's tiles of the list
            if HAS_KEY_START:  # noqa: SIM108  (constexpr branch)
                k_lo = tl.load(KeyStart + b)
            else:
                k_lo = 0
            n_tiles = (n_sel + (TILE // PAGE) - 1) // (TILE // PAGE)
            per_split = (n_tiles + num_splits - 1) // num_splits
            t_begin = split * per_split
            t_end = tl.minimum(t_begin + per_split, n_tiles)
            m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
            l_i = tl.full([BLOCK_G], 0.0, tl.float32)
            acc = tl.full([BLOCK_G, HEAD_DV], 0.0, tl.float32)
            k_base = K + b * stride_kb + hk * stride_kh
            v_base = V + b * stride_vb + hk * stride_vh
            for t in range(t_begin, t_end):
                sc, pos_t, ok = _tile_scores(
                    q, k_base, idx_row, n_sel, t, stride_kn, kv_len, k_lo, KeyValid + b * stride_valid_b, qk_scale,
                    PAGE, TILE, HEAD_D, DOT_PRECISION, HAS_KEY_VALID,
                )
                m_tile = tl.reduce(sc, 1, _MAX)
                acc, l_i, m_i = _accumulate(acc, l_i, m_i, sc, m_tile, v_base, pos_t, ok, stride_vn, HEAD_DV,
                                            DOT_PRECISION)
            rows = pid_bh.to(tl.int64) * group + offs_g  # = b·Hq + query head
            offs_dv = tl.arange(0, HEAD_DV)
            ws = rows * num_splits + split
            tl.store(WS + ws, m_i, mask=g_ok)
            tl.store(WS + ws_rows + ws, l_i, mask=g_ok)
            tl.store(WS + 2 * ws_rows + ws[:, None] * HEAD_DV + offs_dv[None, :], acc, mask=g_ok[:, None])

            # 5. the head's last program merges the S partials
            tl.debug_barrier()
            done = tl.atomic_add(SEM + n_bh + pid_bh, 1, sem="acq_rel")
            if done == num_splits - 1:
                tl.debug_barrier()
                offs_s = tl.arange(0, BLOCK_S)
                s_ok = offs_s < num_splits
                mrows = pid_bh.to(tl.int64) * group + offs_gc
                mg_ok = offs_gc < group
                wsm = mrows[:, None] * num_splits + offs_s[None, :]
                part_ok = mg_ok[:, None] & s_ok[None, :]
                m = tl.load(WS + wsm, mask=part_ok, other=float("-inf"), cache_modifier=".cg")
                den = tl.load(WS + ws_rows + wsm, mask=part_ok, other=0.0, cache_modifier=".cg")
                acc_all = tl.load(WS + 2 * ws_rows + wsm[:, :, None] * HEAD_DV + offs_dv[None, None, :],
                                  mask=part_ok[:, :, None], other=0.0, cache_modifier=".cg")
                m_max = tl.reduce(m, 1, _MAX)
                m_ref = tl.where(m_max == float("-inf"), 0.0, m_max)
                w = tl.exp2(m - m_ref[:, None])  # empty splits (-inf) weigh 0
                total = tl.reduce(den * w, 1, _SUM)
                t_safe = tl.where(total > 0.0, total, 1.0)
                out = tl.reduce(acc_all * w[:, :, None], 1, _SUM) / t_safe[:, None]
                heads = (hk * group + offs_gc).to(tl.int64)
                tl.store(Out + b * stride_ob + heads[:, None] * stride_oh + offs_dv[None, :],
                         out.to(Out.dtype.element_ty), mask=mg_ok[:, None])
                tl.atomic_xchg(SEM + pid_bh, 0)  # every program has passed both counters: ready for the next call
                tl.atomic_xchg(SEM + n_bh + pid_bh, 0)

    _KERNEL_INTERPRETED = is_interpreted(_bound_decode_kernel)
else:
    _KERNEL_INTERPRETED = False


_SEMAPHORES: dict[tuple[str, int | None], torch.Tensor] = {}


def _semaphores(device: torch.device, n: int) -> torch.Tensor:
    """The per-device counters (int32, zeroed once, reset by the kernel itself), at least `n` of them."""
    key = (device.type, device.index)
    buf = _SEMAPHORES.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 256), dtype=torch.int32, device=device)
        _SEMAPHORES[key] = buf
    return buf


def launch_config() -> tuple[int | None, int, int]:
    """`(splits or None, num_warps, num_stages)`; `ATTNPATCH_BOUND_DECODE_CONFIG="splits,warps,stages"`
    (splits 0: the default rule) overrides the default `(None, 4, 3)` for benchmark sweeps ("on" / "auto" /
    "off": see `mode`). 3 stages measured fastest at batch 1 (27.0 against 28.7 µs for 2, 128-token pages, H200)."""
    value = os.environ.get("ATTNPATCH_BOUND_DECODE_CONFIG")
    if not value or value in ("on", "auto", "off"):
        return None, 4, 3
    try:
        splits, warps, stages = (int(x) for x in value.split(","))
    except ValueError as e:
        raise ValueError("ATTNPATCH_BOUND_DECODE_CONFIG must read 'on', 'auto', 'off' or 'splits,warps,stages' (e.g. "
                         f"'16,4,3'), got {value!r}") from e
    return splits or None, warps, stages


def mode() -> str:
    """How the backend takes this kernel, from `ATTNPATCH_BOUND_DECODE_CONFIG`: "off" never; "auto" where it
    measured faster (`too_many_rows_reason`); "on" (or a launch `splits,warps,stages`) whenever it can run.
    Unset: `DEFAULT_MODE`."""
    value = os.environ.get("ATTNPATCH_BOUND_DECODE_CONFIG") or DEFAULT_MODE
    return value if value in ("off", "auto") else "on"


def too_many_rows_reason(query: torch.Tensor, key: torch.Tensor) -> str | None:
    """Why the default rule keeps the separate kernels (None when not): more than `MAX_ROWS` `B·Hkv` rows."""
    rows = query.shape[0] * key.shape[1]
    if rows > MAX_ROWS:
        return (f"{rows} (batch × KV head) rows: above {MAX_ROWS} the separate kernels measured faster "
                "(ATTNPATCH_BOUND_DECODE_CONFIG=on takes it anyway)")
    return None


def choose_splits(heads: int, tiles: int, device: torch.device | str, requested: int | None = None) -> int:
    """Programs per KV head: as many as fit one per SM over the `heads` (`B·Hkv`) rows, at most one per
    tile of the list, at least 1. On a GPU a `requested` count is capped at one program per SM, since CUDA
    refuses a cooperative launch of more programs than are resident at once ("too many blocks")."""
    device = torch.device(device)
    fit = _sm_count(device) // max(heads, 1)
    if requested is not None:
        return max(1, min(requested, fit) if device.type == "cuda" else requested)
    return max(1, min(fit, tiles))


def unsupported_reason(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, page_min: torch.Tensor, k: int,
                       page_size: int, n_pages: int) -> str | None:
    """Why the one-launch kernel cannot run this step (None when it can); the caller keeps the separate path."""
    if not triton_available():
        return "triton is not installed"
    if not tensor_device_ok(query, _KERNEL_INTERPRETED):
        return f"device {query.device} (need CUDA, or CPU with TRITON_INTERPRET=1 set before import)"
    reason = fp32_tiles_reason(query)
    if reason is not None:
        return reason
    if query.dim() != 4 or query.shape[2] != 1:
        return f"query of shape {tuple(query.shape)} (need [B, Hq, 1, D])"
    if query.shape[-1] not in ALLOWED_HEAD_DIMS or key.shape[-1] != query.shape[-1]:
        return f"head dim {query.shape[-1]}; allowed: {ALLOWED_HEAD_DIMS}"
    if value.shape[:3] != key.shape[:3] or value.shape[-1] not in ALLOWED_HEAD_DIMS:
        return f"values of shape {tuple(value.shape)} for keys {tuple(key.shape)}"
    if query.shape[1] % key.shape[1]:
        return f"{query.shape[1]} query heads are not a multiple of {key.shape[1]} KV heads"
    if page_size not in ALLOWED_PAGE_SIZES:
        return f"page size {page_size}; allowed: {ALLOWED_PAGE_SIZES}"
    if n_pages > MAX_PAGES:
        return f"{n_pages} pages (at most {MAX_PAGES})"
    if not 1 <= k <= n_pages:
        return f"k = {k} outside 1..{n_pages}"
    if page_min.dtype != key.dtype or query.dtype != key.dtype:
        return f"dtypes query {query.dtype}, key {key.dtype}, page tables {page_min.dtype} differ"
    if page_min.dim() != 4 or page_min.shape[:2] != key.shape[:2] or page_min.shape[2] < n_pages \
            or page_min.shape[3] != key.shape[3]:
        return f"page tables of shape {tuple(page_min.shape)} (need [B, Hkv, >= {n_pages}, D] of the keys)"
    return None


def few_programs_reason(query: torch.Tensor, key: torch.Tensor, k: int, page_size: int) -> str | None:
    """Why a patched step should keep the separate kernels for speed (None when not): on a GPU, fewer than
    `MIN_SPLITS` programs per KV head. The kernel itself takes any row count."""
    rows = query.shape[0] * key.shape[1]
    splits = choose_splits(rows, -(-k * page_size // default_tile_size(page_size)), query.device)
    if query.is_cuda and splits < MIN_SPLITS:
        return (f"{rows} (batch × KV head) rows leave {splits} program(s) per KV head on this GPU's SMs (fewer than "
                f"{MIN_SPLITS}: the separate kernels spread the reads wider)")
    return None


@on_input_device
def bound_decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    page_min: torch.Tensor,
    page_max: torch.Tensor,
    n_pages: int,
    k: int,
    first: torch.Tensor | int,
    end: torch.Tensor | int,
    *,
    page_size: int,
    scale: float,
    keep_last: int = 0,
    combine: str = "softmax_sum",
    key_start: torch.Tensor | None = None,
    key_valid: torch.Tensor | None = None,
    num_splits: int | None = None,
    return_selection: bool = False,
    counters: torch.Tensor | None = None,
):
    """One decode step over the `k` pages of each KV head with the largest page bounds, in one launch.

    query `[B, Hq, 1, D]`; key / value `[B, Hkv, L, D]`; `page_min` / `page_max` `[B, Hkv, >= n_pages, D]`
    (each page's key min / max, the keys' dtype). The selection is `group_topk_ascending_triton`'s over
    the bounds `page_upper_bounds_triton(query, page_min, page_max, n_pages, scale)` (`first`, `end`,
    `keep_last`, `combine` as there); the attention is `sparse_decode_attention`'s over that selection
    (`key_start`, `key_valid` as there). Returns `out` `[B, Hq, 1, Dv]`, and with `return_selection` also
    `(indices [B, Hkv, k], counts [B, Hkv])` int32 (the list program 0 of each head used). `counters`: int32
    zeros of at least `2·B·Hkv` for the head barrier, left at zero (a cache layer's `barrier_counters`); without
    them a per-device buffer made on the first call is used, which must not be made inside a CUDA-graph pool.
    """
    if combine not in COMBINES:
        raise ValueError(f"bound_decode_attention: combine must be one of {COMBINES}, got {combine!r}")
    reason = unsupported_reason(query, key, value, page_min, k, page_size, n_pages)
    if reason is None and page_max.shape != page_min.shape:
        reason = f"page max table {tuple(page_max.shape)} and min table {tuple(page_min.shape)} differ"
    if reason is not None:
        raise ValueError(f"bound_decode_attention: {reason}")
    b, hq, _, d = query.shape
    hkv, lk, dv = key.shape[1], key.shape[2], value.shape[-1]
    group = hq // hkv
    device = query.device
    query, key, value = (with_contiguous_last_dim(t) for t in (query, key, value))
    page_min, page_max = with_contiguous_last_dim(page_min), with_contiguous_last_dim(page_max)
    first_t, stride_first = per_row_bound(first, b, device, "bound_decode_attention")
    end_t, stride_end = per_row_bound(end, b, device, "bound_decode_attention")
    if key_start is not None:
        key_start = key_start.to(device=device, dtype=torch.int64).contiguous()
    valid_stride = 0
    if key_valid is not None:
        if tuple(key_valid.shape) != (b, lk) or key_valid.dtype != torch.bool:
            raise ValueError(f"key_valid must be bool [B={b}, L={lk}], got {key_valid.dtype} {tuple(key_valid.shape)}")
        key_valid = key_valid.contiguous().view(torch.uint8)
        valid_stride = key_valid.stride(0)
    tile = default_tile_size(page_size)
    tiles = -(-k * page_size // tile)
    splits_override, warps, stages = launch_config()
    splits = choose_splits(b * hkv, tiles, device, num_splits or splits_override)
    block_p = max(16, triton.next_power_of_2(-(-n_pages // splits)))  # pages bounded per program
    heads = b * hkv
    bounds = torch.empty(heads * group * n_pages, dtype=torch.float32, device=device)
    lists = torch.empty(heads * splits * k, dtype=torch.int32, device=device)
    counts = torch.empty(heads * splits, dtype=torch.int32, device=device)
    ws_rows = b * hq * splits
    ws = torch.empty(ws_rows * (dv + 2), dtype=torch.float32, device=device)
    out = torch.empty(b, hq, 1, dv, dtype=query.dtype, device=device)
    search = _topk_launch(n_pages)[0]  # the group top-k kernel's search for rows of n_pages
    block_g = max(16, triton.next_power_of_2(group))
    args = (
        query, key, value, page_min, page_max, first_t, end_t, bounds, lists, counts, ws, None, out,
        key_start if key_start is not None else counts, key_valid if key_valid is not None else counts,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2),
        page_min.stride(0), page_min.stride(1), page_min.stride(2),
        page_max.stride(0), page_max.stride(1), page_max.stride(2), stride_first, stride_end,
        out.stride(0), out.stride(1), valid_stride,
        hkv, group, lk, n_pages, k, int(keep_last), splits, ws_rows, float(scale), float(scale) * _LOG2E,
    )  # fmt: skip
    meta = dict(
        PAGE=page_size, TILE=tile, BLOCK_G=block_g, BLOCK_GC=triton.next_power_of_2(group), HEAD_D=d, HEAD_DV=dv,
        BLOCK_P=block_p, BLOCK_N=max(16, triton.next_power_of_2(n_pages)), BLOCK_K=max(16, triton.next_power_of_2(k)),
        BLOCK_S=max(2, triton.next_power_of_2(splits)), SOFTMAX_SUM=combine == "softmax_sum", SEARCH=search,
        FUSED_COUNTS=not _KERNEL_INTERPRETED, DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        HAS_KEY_START=key_start is not None, HAS_KEY_VALID=key_valid is not None, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    if counters is None:
        sem = _semaphores(device, 2 * heads)
    elif counters.dtype != torch.int32 or counters.device != device or counters.numel() < 2 * heads \
            or not counters.is_contiguous():
        raise ValueError(f"bound_decode_attention: counters must be contiguous int32 on {device} with at least "
                         f"{2 * heads} elements (2 · batch · KV heads), got {counters.dtype} {tuple(counters.shape)} "
                         f"on {counters.device}")
    else:
        sem = counters
    args = args[:11] + (sem,) + args[12:]
    if _KERNEL_INTERPRETED:  # programs run in turn: the bounds first, then the rest
        _bound_decode_kernel[(heads, splits)](*args, PHASE=1, **meta)
        _bound_decode_kernel[(heads, splits)](*args, PHASE=2, **meta)
    else:
        _bound_decode_kernel[(heads, splits)](*args, PHASE=0, launch_cooperative_grid=True, **meta)
    if not return_selection:
        return out
    first_rows = torch.arange(heads, device=device) * splits
    return out, (lists.view(heads * splits, k)[first_rows].view(b, hkv, k), counts[first_rows].view(b, hkv))
