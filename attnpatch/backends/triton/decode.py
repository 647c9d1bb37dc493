"""Split-KV (flash-decoding style) sparse decode attention in Triton: executes a `PageSelection`.

One decode step: query ``[B, Hq, 1, D]`` against the selected pages of a Hugging Face
`DynamicCache` layer, key/value ``[B, Hkv, L, D]`` (unit stride along D; any B/H/L strides, so a
slice of a larger cache works in place).

Layout of the work
------------------

* **GQA packing.** One program serves *all* ``G = Hq / Hkv`` query heads of a KV head: the G query
  rows are stacked (zero-padded to ``BLOCK_G = max(16, next_pow2(G))`` for ``tl.dot``), so every
  selected K/V tile is read once per KV head, not once per query head.
* **Tiles.** A tile is ``TILE`` consecutive entries of the selected *token* list: ``TILE //
  page_size`` consecutive entries of the (ascending) page list, gathered page by page (each page is
  ``page_size`` contiguous cache rows). Default ``TILE = max(page_size, 64)`` so that every load is
  at least 64 rows × D. Positions ``>= kv_len`` and list entries ``>= counts`` are masked.
* **Split-KV.** Grid ``(B·Hkv, num_splits)``. A head with ``n`` tiles gives split ``s`` the tiles
  ``[s·c, min((s+1)·c, n))`` with ``c = ceil(n / num_splits)`` (per-head balanced; trailing splits
  of short lists are empty). Each split writes its partial ``(m, l, acc)`` (fp32) to a workspace and
  a small merge kernel combines the splits by log-sum-exp. With one split the main kernel writes
  the output directly and no merge runs. ``num_splits=None`` picks a count from the SM count and
  the (host-known, padded) page-list width, so no device→host sync happens (see
  `choose_num_splits`).

Partial state, per query row, in base 2 (``s₂ = σ·q·k·log2 e``): ``m`` running max of ``s₂``,
``l = Σ 2^(s₂ − m)``, ``acc = Σ 2^(s₂ − m)·v``; ``lse = (m + log2 l)·ln 2`` and ``out = acc / l``.

Skip-threshold mode (BLASST, arXiv 2512.12087)
----------------------------------------------

With ``skip_bound`` (ln λ on scaled scores ``σ·q·k``, the one convention of
`attnpatch.sparsity.SkipRule`; a float, or a tensor of 1 or ``Hq`` per-head values) a tile is
*skipped* — its V tile is not loaded, no exponentials, no P·V, no state update — when, for every
one of the G query rows, ``tile_row_max − running_row_max < skip_bound``. Rows that do not vote: padding rows (``g >=
G``) and rows whose tile max is ``-inf`` (tile entirely masked; such a tile changes nothing). A row
whose running max is ``-inf`` always vetoes (difference ``+inf``). The very first tile of a head's
list (tile 0, usually the attention-sink page 0) is always visited, whatever λ.

*Split-KV weakens skipping.* A sequential pass carries one running max over the whole list; a
split only knows the max of its own prefix. Without seeding every split's first tile is always
computed (running max ``-inf``) and later tiles of a split are compared with a smaller max, so
fewer tiles are skipped the more splits there are. Mitigation (``seed_max=True``, the default in
skip mode): a cheap up-front pass computes, per KV head, the row max of tile 0 (page 0 / sink
pages — in LLMs usually where the row max lives) and every split starts its running max from it
(``l = 0``, ``acc = 0``). Tile 0 is visited by split 0, so the seed never exceeds the final max
and the arithmetic on the kept tiles stays exact (the seed only serves as the exponent reference,
like any running max); seeding changes *which* tiles are skipped, nothing else. A seeded split's
running max is still never larger than the sequential one at the same tile, so it skips at most
what a sequential pass visiting the same tiles would. The seed pass loads one K tile per KV head;
it is not included in the tile counters.

``count_tiles=True`` appends ``(visited, skipped)`` as 0-dim int64 tensors: ``visited`` counts the
tiles whose K was read (the selected list, in tiles; skipped tiles included), ``skipped`` those of
them that skipped V/exp/P·V.

`attnpatch.backends.reference.sparse_decode_attention_reference` is the PyTorch oracle of exactly
these semantics (same tiles, split boundaries, seeding, skip rule); with ``skip_bound=None`` the
kernel equals
`attnpatch.backends.reference.paged_decode_attention`.
"""

from __future__ import annotations

import torch

from attnpatch.backends.decode_plan import (
    ALLOWED_HEAD_DIMS,
    ALLOWED_PAGE_SIZES,
    ALLOWED_TILE_SIZES,
    check_decode,
    decode_input_reason,
    empty_result,
    launch_override,
)
from attnpatch.backends.partial_state import pack_results
from attnpatch.backends.skip_bound import bound_per_head, bound_scalar
from attnpatch.backends.triton.utils import (
    fp32_tiles_reason,
    is_interpreted,
    on_input_device,
    tensor_device_ok,
    triton_available,
    with_contiguous_last_dim,
)
from attnpatch.sparsity import PageSelection, num_blocks

__all__ = [
    "ALLOWED_HEAD_DIMS",
    "ALLOWED_PAGE_SIZES",
    "ALLOWED_TILE_SIZES",
    "sparse_decode_attention",
    "unsupported_reason",
]

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

if triton_available():
    import triton
    import triton.language as tl

    # Row reductions go through `tl.reduce` with these combine functions instead of `tl.max` /
    # `tl.sum` (same code on the GPU): when triton was imported before TRITON_INTERPRET was set,
    # the @jit library helpers of triton.language (`tl.max`, `tl.sum`, `tl.zeros`, ...) are
    # compiled-only and cannot run under the interpreter, whereas builtins and `tl.reduce` are
    # patched by it at call time. For the same reason `tl.full` is used instead of `tl.zeros`.
    # The interpreter takes a NumPy fast path when the combine functions are the library's own.
    from attnpatch.backends.triton.combine import MAX_COMBINE as _max_combine
    from attnpatch.backends.triton.combine import SUM_COMBINE as _sum_combine

    @triton.jit
    def _load_query_rows(Q, b, hk, stride_qb, stride_qh, group, BLOCK_G: tl.constexpr, HEAD_D: tl.constexpr):
        offs_g = tl.arange(0, BLOCK_G)
        heads = (hk * group + offs_g).to(tl.int64)
        ptrs = Q + b * stride_qb + heads[:, None] * stride_qh + tl.arange(0, HEAD_D)[None, :]
        return tl.load(ptrs, mask=(offs_g < group)[:, None], other=0.0)

    @triton.jit
    def _tile_scores(
        q, k_base, idx_row, n_sel, t, stride_kn, kv_len, k_lo, valid_row, qk_scale,
        PAGE: tl.constexpr, TILE: tl.constexpr, HEAD_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
        HAS_KEY_VALID: tl.constexpr,
    ):  # fmt: skip
        # Cache positions of tile t (TILE // PAGE consecutive list entries), validity, and the
        # base-2 scaled scores [BLOCK_G, TILE] (-inf where masked).
        offs_n = tl.arange(0, TILE)
        if TILE == PAGE:
            page = tl.load(idx_row + t)
            pos = page.to(tl.int64) * PAGE + offs_n
            ok = (pos >= k_lo) & (pos < kv_len)  # bad page numbers are masked, never read
        else:
            entry = t * (TILE // PAGE) + offs_n // PAGE
            entry_ok = entry < n_sel
            page = tl.load(idx_row + entry, mask=entry_ok, other=0)
            pos = page.to(tl.int64) * PAGE + (offs_n % PAGE)
            ok = entry_ok & (pos >= k_lo) & (pos < kv_len)
        # K is loaded under the position mask only, so its load does not wait for the validity load (two
        # dependent memory round trips per tile otherwise); invalid keys' scores are masked below, and V
        # (loaded under the full mask) is never read for them.
        k = tl.load(
            k_base + pos[:, None] * stride_kn + tl.arange(0, HEAD_D)[None, :], mask=ok[:, None], other=0.0
        )
        if HAS_KEY_VALID:  # per-key validity (padding anywhere, empty slots of a static cache)
            ok = ok & (tl.load(valid_row + pos, mask=ok, other=0) != 0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(ok[None, :], s, float("-inf"))
        return s, pos, ok

    @triton.jit
    def _accumulate(
        acc, l_i, m_i, s, m_tile, v_base, pos, ok, stride_vn, HEAD_DV: tl.constexpr, DOT_PRECISION: tl.constexpr
    ):  # fmt: skip
        # V is loaded here, so skipped tiles never read it.
        v = tl.load(
            v_base + pos[:, None] * stride_vn + tl.arange(0, HEAD_DV)[None, :], mask=ok[:, None], other=0.0
        )
        m_new = tl.maximum(m_i, m_tile)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.reduce(p, 1, _sum_combine)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        return acc, l_i, m_new

    @triton.jit
    def _store_page_lse(
        PageLse, rows, g_ok, s, idx_row, n_sel, t, n_pages,
        PAGE: tl.constexpr, TILE: tl.constexpr, BLOCK_G: tl.constexpr,
    ):  # fmt: skip
        # Each listed page's natural-log log-sum-exp of the tile's base-2 scores `s` [BLOCK_G, TILE], per
        # query row: PageLse[row, page] (-inf where no key of the page is visible).
        per: tl.constexpr = TILE // PAGE
        s3 = tl.reshape(s, [BLOCK_G, per, PAGE])
        m = tl.reduce(s3, 2, _max_combine)
        m_ref = tl.where(m == float("-inf"), 0.0, m)
        total = tl.reduce(tl.exp2(s3 - m_ref[:, :, None]), 2, _sum_combine)
        seen = m > float("-inf")
        lse = tl.where(seen, (m_ref + tl.log2(tl.where(seen, total, 1.0))) * 0.6931471805599453, float("-inf"))
        entry = t * per + tl.arange(0, per)
        listed = entry < n_sel
        page = tl.load(idx_row + entry, mask=listed, other=0).to(tl.int64)
        tl.store(PageLse + rows[:, None] * n_pages + page[None, :], lse,
                 mask=g_ok[:, None] & (listed & (page < n_pages))[None, :])

    @triton.jit
    def _decode_seed_kernel(
        Q, K, Idx, Cnt, Seed, KeyStart, KeyValid,
        stride_qb, stride_qh, stride_kb, stride_kh, stride_kn,
        stride_ib, stride_ih, stride_cb, stride_ch, stride_valid_b,
        n_kv_heads, group, kv_len, max_pages, qk_scale,
        PAGE: tl.constexpr, TILE: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_D: tl.constexpr,
        DOT_PRECISION: tl.constexpr, HAS_KEY_START: tl.constexpr, HAS_KEY_VALID: tl.constexpr,
    ):  # fmt: skip
        # Row max of tile 0 of each KV head's list: the running-max seed of every split.
        pid_bh = tl.program_id(0)
        b = (pid_bh // n_kv_heads).to(tl.int64)
        hk = (pid_bh % n_kv_heads).to(tl.int64)
        q = _load_query_rows(Q, b, hk, stride_qb, stride_qh, group, BLOCK_G, HEAD_D)
        if HAS_KEY_START:  # noqa: SIM108  (constexpr branch kept explicit)
            k_lo = tl.load(KeyStart + b)
        else:
            k_lo = 0
        n_sel = tl.minimum(tl.load(Cnt + b * stride_cb + hk * stride_ch), max_pages)
        idx_row = Idx + b * stride_ib + hk * stride_ih
        k_base = K + b * stride_kb + hk * stride_kh
        offs_g = tl.arange(0, BLOCK_G)
        m0 = tl.full([BLOCK_G], float("-inf"), tl.float32)
        if n_sel > 0:
            s, pos, ok = _tile_scores(
                q, k_base, idx_row, n_sel, 0, stride_kn, kv_len, k_lo, KeyValid + b * stride_valid_b, qk_scale,
                PAGE, TILE, HEAD_D, DOT_PRECISION, HAS_KEY_VALID,
            )
            m0 = tl.reduce(s, 1, _max_combine)
        tl.store(Seed + pid_bh * BLOCK_G + offs_g, m0)

    @triton.jit
    def _decode_split_kernel(
        Q, K, V, Idx, Cnt, Seed, Thr, Ws, Out, Lse, Tiles, KeyStart, KeyValid, PageLse,
        stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
        stride_ib, stride_ih, stride_cb, stride_ch, stride_ob, stride_oh, stride_valid_b,
        n_kv_heads, group, kv_len, max_pages, num_splits, ws_rows, qk_scale, thr_all, n_pages,
        PAGE: tl.constexpr, TILE: tl.constexpr, BLOCK_G: tl.constexpr,
        HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
        SKIP: tl.constexpr, PER_HEAD_THR: tl.constexpr, SEEDED: tl.constexpr, DIRECT: tl.constexpr,
        WRITE_LSE: tl.constexpr, COUNT: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_KEY_START: tl.constexpr,
        HAS_KEY_VALID: tl.constexpr, WRITE_PAGE_LSE: tl.constexpr,
    ):  # fmt: skip
        pid_bh = tl.program_id(0)
        split = tl.program_id(1)
        b = (pid_bh // n_kv_heads).to(tl.int64)
        hk = (pid_bh % n_kv_heads).to(tl.int64)
        offs_g = tl.arange(0, BLOCK_G)
        g_ok = offs_g < group
        offs_dv = tl.arange(0, HEAD_DV)

        q = _load_query_rows(Q, b, hk, stride_qb, stride_qh, group, BLOCK_G, HEAD_D)
        k_base = K + b * stride_kb + hk * stride_kh
        v_base = V + b * stride_vb + hk * stride_vh
        idx_row = Idx + b * stride_ib + hk * stride_ih
        if HAS_KEY_START:  # noqa: SIM108  (constexpr branch) left padding: first real key
            k_lo = tl.load(KeyStart + b)
        else:
            k_lo = 0
        n_sel = tl.minimum(tl.load(Cnt + b * stride_cb + hk * stride_ch), max_pages)  # counts > P: clamp
        n_tiles = (n_sel + (TILE // PAGE) - 1) // (TILE // PAGE)
        per_split = (n_tiles + num_splits - 1) // num_splits
        t_begin = split * per_split
        t_end = tl.minimum(t_begin + per_split, n_tiles)

        if SEEDED:  # noqa: SIM108  (constexpr branch kept explicit)
            m_i = tl.load(Seed + pid_bh * BLOCK_G + offs_g)
        else:
            m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.full([BLOCK_G], 0.0, tl.float32)
        acc = tl.full([BLOCK_G, HEAD_DV], 0.0, tl.float32)
        if SKIP:
            if PER_HEAD_THR:  # noqa: SIM108  (constexpr branch kept explicit)
                thr = tl.load(Thr + hk * group + offs_g, mask=g_ok, other=0.0)
            else:
                thr = thr_all
        n_skip = tl.full([], 0, tl.int32)

        for t in range(t_begin, t_end):
            s, pos, ok = _tile_scores(
                q, k_base, idx_row, n_sel, t, stride_kn, kv_len, k_lo, KeyValid + b * stride_valid_b, qk_scale,
                PAGE, TILE, HEAD_D, DOT_PRECISION, HAS_KEY_VALID,
            )
            m_tile = tl.reduce(s, 1, _max_combine)
            if SKIP:
                row_skip = ((m_tile - m_i) < thr) | (m_tile == float("-inf")) | (offs_g >= group)
                n_keep = tl.reduce((row_skip == 0).to(tl.int32), 0, _sum_combine)
                visit = (n_keep > 0) | (t == 0)
                n_skip += (visit == 0).to(tl.int32)
                if visit:
                    acc, l_i, m_i = _accumulate(
                        acc, l_i, m_i, s, m_tile, v_base, pos, ok, stride_vn, HEAD_DV, DOT_PRECISION
                    )
            else:
                if WRITE_PAGE_LSE:
                    _store_page_lse(PageLse, pid_bh.to(tl.int64) * group + offs_g, g_ok, s, idx_row, n_sel, t,
                                    n_pages, PAGE, TILE, BLOCK_G)
                acc, l_i, m_i = _accumulate(
                    acc, l_i, m_i, s, m_tile, v_base, pos, ok, stride_vn, HEAD_DV, DOT_PRECISION
                )

        rows = pid_bh.to(tl.int64) * group + offs_g  # = b·Hq + query head
        if DIRECT:
            seen = l_i > 0.0
            l_safe = tl.where(seen, l_i, 1.0)
            out = acc / l_safe[:, None]
            heads = (hk * group + offs_g).to(tl.int64)
            o_ptrs = Out + b * stride_ob + heads[:, None] * stride_oh + offs_dv[None, :]
            tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=g_ok[:, None])
            if WRITE_LSE:
                lse = tl.where(seen, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
                tl.store(Lse + rows, lse, mask=g_ok)
        else:
            # one fp32 workspace: m [ws_rows], then l [ws_rows], then acc [ws_rows, Dv]
            ws = rows * num_splits + split
            tl.store(Ws + ws, m_i, mask=g_ok)
            tl.store(Ws + ws_rows + ws, l_i, mask=g_ok)
            tl.store(Ws + 2 * ws_rows + ws[:, None] * HEAD_DV + offs_dv[None, :], acc, mask=g_ok[:, None])
        if COUNT:
            slot = (pid_bh * num_splits + split).to(tl.int64) * 2
            tl.store(Tiles + slot, tl.maximum(t_end - t_begin, 0))
            tl.store(Tiles + slot + 1, n_skip)

    @triton.jit
    def _decode_merge_kernel(
        Ws, Out, Lse, n_q_heads, num_splits, ws_rows, stride_ob, stride_oh,
        BLOCK_S: tl.constexpr, HEAD_DV: tl.constexpr, WRITE_LSE: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)  # = b·Hq + query head
        b = row // n_q_heads
        h = row % n_q_heads
        offs_s = tl.arange(0, BLOCK_S)
        s_ok = offs_s < num_splits
        offs_dv = tl.arange(0, HEAD_DV)
        ws = row * num_splits + offs_s
        m = tl.load(Ws + ws, mask=s_ok, other=float("-inf"))
        den = tl.load(Ws + ws_rows + ws, mask=s_ok, other=0.0)
        acc = tl.load(Ws + 2 * ws_rows + ws[:, None] * HEAD_DV + offs_dv[None, :], mask=s_ok[:, None], other=0.0)
        m_max = tl.reduce(m, 0, _max_combine)
        m_ref = tl.where(m_max == float("-inf"), 0.0, m_max)
        w = tl.exp2(m - m_ref)  # -inf partials (empty splits) weigh 0
        total = tl.reduce(den * w, 0, _sum_combine)
        seen = total > 0.0
        t_safe = tl.where(seen, total, 1.0)
        out = tl.reduce(acc * w[:, None], 0, _sum_combine) / t_safe
        tl.store(Out + b * stride_ob + h * stride_oh + offs_dv, out.to(Out.dtype.element_ty))
        if WRITE_LSE:
            tl.store(Lse + row, tl.where(seen, (m_ref + tl.log2(t_safe)) * 0.6931471805599453, float("-inf")))

    _KERNEL_INTERPRETED = is_interpreted(_decode_split_kernel)
else:
    _KERNEL_INTERPRETED = False


def _kernel_reason(query: torch.Tensor) -> str | None:
    if not triton_available():
        return "triton is not installed"
    if not tensor_device_ok(query, _KERNEL_INTERPRETED):
        return f"device {query.device} (need CUDA, or CPU with TRITON_INTERPRET=1 set before import)"
    return fp32_tiles_reason(query)


def unsupported_reason(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, selection: PageSelection,
                       tile_size: int | None = None) -> str | None:
    """Why the kernel cannot run these inputs (None when it can), so a caller may fall back."""
    if not triton_available():
        return "triton is not installed"
    return decode_input_reason(query, key, value, selection, tile_size) or _kernel_reason(query)


def _launch_config(tile: int, dv: int, dtype: torch.dtype) -> tuple[int, int]:
    """(num_warps, num_stages) of the split kernel. On the H200, for 128-token tiles of head dim 128,
    this default is within 0.3 µs of the best of warps 2/4/8 × stages 1–4 × splits
    (bench/results/decode_tune.json); other tile shapes are not tuned. `ATTNPATCH_DECODE_CONFIG`
    overrides it (`decode_plan.launch_override`; sweeps: bench/scripts/decode_layer.py --kernel-sweep)."""
    override = launch_override()
    if override is not None:
        return override[0], override[1]
    stage_bytes = 2 * tile * dv * (4 if dtype == torch.float32 else 2)  # one K + one V tile
    stages = 3 if stage_bytes <= 32 * 1024 else 2 if stage_bytes <= 64 * 1024 else 1
    return 4, stages


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _selection_tensor(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    # int32 with unit stride along the page list; expanded (stride-0) batch/head dims stay views.
    if t.dtype != torch.int32 or t.device != device:
        t = t.to(device=device, dtype=torch.int32)
    if t.dim() == 3 and t.shape[-1] > 1 and t.stride(-1) != 1:
        t = t.contiguous()
    return t


@on_input_device
def sparse_decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    selection: PageSelection,
    scale: float | None = None,
    return_lse: bool = False,
    skip_bound: float | torch.Tensor | None = None,
    num_splits: int | None = None,
    count_tiles: bool = False,
    seed_max: bool = True,
    tile_size: int | None = None,
    key_start: torch.Tensor | None = None,
    key_valid: torch.Tensor | None = None,
    page_lse: torch.Tensor | None = None,
):
    """Single-token attention over the selected pages of each KV head (split-KV, GQA-packed).

    query ``[B, Hq, 1, D]``; key/value ``[B, Hkv, L, D]`` (unit stride along D, any other strides);
    ``Hq`` a multiple of ``Hkv``; D ∈ `ALLOWED_HEAD_DIMS`; ``selection.page_size`` ∈
    `ALLOWED_PAGE_SIZES`; fp16, bf16 or fp32 (CUDA, or CPU under ``TRITON_INTERPRET=1``).
    Unsupported inputs raise ValueError naming what is allowed (see `unsupported_reason`).

    * ``scale``: softmax scale σ (default ``1/sqrt(D)``).
    * ``skip_bound``: ln λ on scaled scores (float, or tensor of 1 or ``Hq`` values) enables BLASST
      tile skipping; ``seed_max``
      seeds each split's running max with the row max of tile 0 (module docstring).
    * ``key_start``: int ``[B]``, left padding — cache positions before ``key_start[b]`` are masked.
    * ``key_valid``: bool ``[B, L]`` (unit stride along L), per-key validity — keys where it is False
      are masked (padding anywhere, the empty slots of a static cache); read with the keys of a tile.
    * ``page_lse``: float32 ``[B, Hq, ceil(L / page_size)]`` (unit stride along the pages), written
      with each listed page's natural-log log-sum-exp of its visible keys' scaled scores per query head
      (``-inf`` for a page without one); the pages not listed are left as they are. What a Recycled
      refresh ranks pages by, from the same pass over K (`attnpatch.estimators.page_lse` reads K again).
      Not with ``skip_bound`` (a skipped tile has no scores).
    * ``num_splits``: splits per KV head (None: `resolve_num_splits`); ``tile_size``: tokens per
      tile, a multiple of the page size in `ALLOWED_TILE_SIZES` (None: ``max(page_size, 64)``).

    Returns ``out`` ``[B, Hq, 1, Dv]`` in the input dtype, then when requested the natural-log
    ``lse`` ``[B, Hq, 1]`` float32 and ``(visited_tiles, skipped_tiles)`` 0-dim int64 tensors.
    A head with no selected key gives 0 output and ``lse = -inf``.
    """
    scale, tile, splits = check_decode(query, key, value, selection, scale, tile_size, num_splits,
                                       "sparse_decode_attention", _kernel_reason(query))
    b, hq, _, d = query.shape
    hkv, lk, dv = key.shape[1], key.shape[2], value.shape[-1]
    if b * hq == 0 or lk == 0 or selection.indices.shape[-1] == 0:
        return empty_result(query, value, return_lse, count_tiles)
    device = query.device
    group = hq // hkv
    block_g = max(16, _next_pow2(group))
    skip = skip_bound is not None
    seeded = skip and seed_max
    direct = splits == 1

    query = with_contiguous_last_dim(query)
    key = with_contiguous_last_dim(key)
    value = with_contiguous_last_dim(value)
    indices = _selection_tensor(selection.indices, device)
    counts = _selection_tensor(selection.counts, device)
    if key_start is not None:
        key_start = key_start.to(device=device, dtype=torch.int64).contiguous()
        if tuple(key_start.shape) != (b,):
            raise ValueError(f"key_start must be [B={b}], got {tuple(key_start.shape)}")
    if key_valid is not None:
        if tuple(key_valid.shape) != (b, lk) or key_valid.dtype != torch.bool:
            raise ValueError(f"key_valid must be bool [B={b}, L={lk}], got {key_valid.dtype} {tuple(key_valid.shape)}")
        key_valid = key_valid.to(device)
        if key_valid.stride(-1) != 1:
            key_valid = key_valid.contiguous()
        key_valid = key_valid.view(torch.uint8)
    valid_ptr = key_valid if key_valid is not None else counts  # unused pointer when absent: any tensor
    valid_stride = key_valid.stride(0) if key_valid is not None else 0
    n_pages = num_blocks(lk, selection.page_size)
    if page_lse is not None:
        if skip:
            raise ValueError("sparse_decode_attention: page_lse cannot be written in skip mode (skipped tiles have "
                             "no scores); pass skip_bound=None")
        if (page_lse.dtype != torch.float32 or tuple(page_lse.shape) != (b, hq, n_pages)
                or page_lse.device != device or not page_lse.is_contiguous()):
            raise ValueError(f"page_lse must be a contiguous float32 [B={b}, Hq={hq}, pages={n_pages}] tensor on "
                             f"{device}, got {page_lse.dtype} {tuple(page_lse.shape)} on {page_lse.device}")
    # A float λ travels as a kernel scalar (no per-call tensor); a tensor λ as [Hq] thresholds.
    thr, thr_all = None, 0.0
    if skip and isinstance(skip_bound, torch.Tensor):
        thr = bound_per_head(skip_bound, hq, device, base2=True)
    elif skip:
        thr_all = bound_scalar(skip_bound, base2=True)

    out = torch.empty(b, hq, 1, dv, dtype=query.dtype, device=device)
    lse = torch.empty(b, hq, 1, dtype=torch.float32, device=device) if return_lse else None
    ws_rows = b * hq * splits
    ws = None if direct else torch.empty(ws_rows * (dv + 2), dtype=torch.float32, device=device)
    tiles = torch.empty(b * hkv * splits * 2, dtype=torch.int32, device=device) if count_tiles else None
    precision = "ieee" if query.dtype == torch.float32 else "tf32"
    qk_scale = scale * _LOG2E
    idx_strides = (indices.stride(0), indices.stride(1))
    cnt_strides = (counts.stride(0), counts.stride(1))

    seed = None
    if seeded:
        seed = torch.empty(b * hkv * block_g, dtype=torch.float32, device=device)  # the seed pass fills it
        _decode_seed_kernel[(b * hkv,)](
            query, key, indices, counts, seed, key_start if key_start is not None else counts, valid_ptr,
            query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2),
            *idx_strides, *cnt_strides, valid_stride,
            hkv, group, lk, indices.shape[-1], qk_scale,
            PAGE=selection.page_size, TILE=tile, BLOCK_G=block_g, HEAD_D=d, DOT_PRECISION=precision,
            HAS_KEY_START=key_start is not None, HAS_KEY_VALID=key_valid is not None, num_warps=4, num_stages=1,
        )  # fmt: skip

    warps, stages = _launch_config(tile, dv, query.dtype)
    block_s = max(2, _next_pow2(splits))
    _decode_split_kernel[(b * hkv, splits)](
        query, key, value, indices, counts,
        seed if seed is not None else out, thr if thr is not None else out,  # unused pointers: any tensor
        ws if ws is not None else out, out, lse if lse is not None else out,
        tiles if tiles is not None else out, key_start if key_start is not None else counts, valid_ptr,
        page_lse if page_lse is not None else out,
        query.stride(0), query.stride(1),
        key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2),
        *idx_strides, *cnt_strides, out.stride(0), out.stride(1), valid_stride,
        hkv, group, lk, indices.shape[-1], splits, ws_rows, qk_scale, thr_all, n_pages,
        PAGE=selection.page_size, TILE=tile, BLOCK_G=block_g, HEAD_D=d, HEAD_DV=dv,
        SKIP=skip, PER_HEAD_THR=thr is not None, SEEDED=seeded, DIRECT=direct, WRITE_LSE=return_lse, COUNT=count_tiles,
        DOT_PRECISION=precision, HAS_KEY_START=key_start is not None, HAS_KEY_VALID=key_valid is not None,
        WRITE_PAGE_LSE=page_lse is not None, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    if not direct:
        _decode_merge_kernel[(b * hq,)](
            ws, out, lse if lse is not None else out,
            hq, splits, ws_rows, out.stride(0), out.stride(1),
            BLOCK_S=block_s, HEAD_DV=dv, WRITE_LSE=return_lse,
            num_warps=4 if dv >= 128 else 2,
        )  # fmt: skip

    tile_counts = None
    if tiles is not None:
        totals = tiles.view(-1, 2).sum(0, dtype=torch.int64)
        tile_counts = (totals[0], totals[1])
    return pack_results(out, lse, tile_counts)
