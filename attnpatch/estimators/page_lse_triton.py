"""Fused Triton kernel for the per-page log-sum-exp of one decode query's scores
(`attnpatch.estimators.page_lse`): for every page `p` and query head, `log Σ_{j∈p, visible} exp(σ·q·k_j)`.

A softmax of a head's row over the pages is then each page's share of that head's attention mass, what
Recycled Attention ranks pages by, without an `[B, Hq, L]` probability tensor.

One program per (batch · KV head, chunk of `TILES_PER_PROGRAM` tiles of 64 keys): the G query rows of the
KV head are loaded once (zero-padded to 16 rows for `tl.dot`), each key tile once; the tile's scores
`[G, 64]` are reshaped to `[G, 64 / page_size, page_size]` and reduced per page. Keys before `key_start[b]`,
at or past `kv_len`, or where `key_valid` is False are masked; a page with no visible key gives `-inf`.

`flag` (a 1-element int tensor on the device, optional): when it reads 0 every program returns at once
and the output is left unwritten. A compiled decode step that needs the ranking only on some steps (a
Recycled refresh) launches the kernel every step — one fixed graph, no branch, no host sync — and pays for
it only when the flag is set (the caller discards the unwritten output with `torch.where`).

`page_lse_op` (`page_lse_op.py`) wraps it as a torch custom op for compiled decode steps.
"""

from __future__ import annotations

import torch

from attnpatch.backends.decode_plan import ALLOWED_PAGE_SIZES
from attnpatch.backends.triton.utils import (
    is_interpreted,
    on_input_device,
    scorer_input_reason,
    triton_available,
)
from attnpatch.sparsity import num_blocks

__all__ = ["ALLOWED_PAGE_SIZES", "page_lse_triton", "unsupported_reason"]

TILES_PER_PROGRAM = 8
NUM_WARPS = 4
_LOG2E = 1.4426950408889634

if triton_available():
    import triton
    import triton.language as tl

    from attnpatch.backends.triton.combine import MAX_COMBINE as _MAX
    from attnpatch.backends.triton.combine import SUM_COMBINE as _SUM

    @triton.jit
    def _page_lse_kernel(
        Q, K, FLAG, KEY_START, KEY_VALID, OUT,
        stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_valid_b,
        n_kv_heads, group, kv_len, n_pages, qk_scale,
        PAGE: tl.constexpr, TILE: tl.constexpr, TILES: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_D: tl.constexpr,
        BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_FLAG: tl.constexpr, HAS_KEY_START: tl.constexpr,
        HAS_KEY_VALID: tl.constexpr,
    ):  # fmt: skip
        if HAS_FLAG:  # noqa: SIM108  (constexpr branch kept explicit)
            go = tl.load(FLAG)
        else:
            go = 1
        if go != 0:
            pid_bh = tl.program_id(0)
            chunk = tl.program_id(1)
            b = (pid_bh // n_kv_heads).to(tl.int64)
            hk = (pid_bh % n_kv_heads).to(tl.int64)
            offs_g = tl.arange(0, BLOCK_G)
            offs_d = tl.arange(0, BLOCK_D)
            g_ok = offs_g < group
            d_ok = offs_d < HEAD_D
            heads = (hk * group + offs_g).to(tl.int64)
            q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                        mask=g_ok[:, None] & d_ok[None, :], other=0.0)
            if HAS_KEY_START:  # noqa: SIM108
                k_lo = tl.load(KEY_START + b)
            else:
                k_lo = 0
            k_base = K + b * stride_kb + hk * stride_kh
            out_rows = OUT + (pid_bh.to(tl.int64) * group + offs_g.to(tl.int64))[:, None] * n_pages
            n_tiles = (kv_len + TILE - 1) // TILE
            t_begin = chunk * TILES
            t_end = tl.minimum(t_begin + TILES, n_tiles)
            for t in range(t_begin, t_end):
                pos = (t * TILE + tl.arange(0, TILE)).to(tl.int64)
                ok = (pos >= k_lo) & (pos < kv_len)
                k = tl.load(k_base + pos[:, None] * stride_kn + offs_d[None, :], mask=ok[:, None] & d_ok[None, :],
                            other=0.0)
                if HAS_KEY_VALID:
                    ok = ok & (tl.load(KEY_VALID + b * stride_valid_b + pos, mask=ok, other=0) != 0)
                s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
                s = tl.where(ok[None, :], s, float("-inf"))
                s3 = tl.reshape(s, [BLOCK_G, TILE // PAGE, PAGE])
                m = tl.reduce(s3, 2, _MAX)
                m_ref = tl.where(m == float("-inf"), 0.0, m)
                total = tl.reduce(tl.exp2(s3 - m_ref[:, :, None]), 2, _SUM)
                lse = tl.where(total > 0.0, (m_ref + tl.log2(tl.where(total > 0.0, total, 1.0))) * 0.6931471805599453,
                               float("-inf"))
                pages = t * (TILE // PAGE) + tl.arange(0, TILE // PAGE)
                tl.store(out_rows + pages[None, :], lse, mask=g_ok[:, None] & (pages < n_pages)[None, :])

    _KERNEL_INTERPRETED = is_interpreted(_page_lse_kernel)
else:
    _KERNEL_INTERPRETED = False


def unsupported_reason(query: torch.Tensor, key: torch.Tensor, page_size: int) -> str | None:
    """Why the kernel cannot take these inputs (None when it can): the caller runs the torch path."""
    reason = scorer_input_reason(query, key, _KERNEL_INTERPRETED)
    if reason is not None:
        return reason
    if query.shape[2] != 1:
        return f"{query.shape[2]} query positions (a decode step has 1)"
    if page_size not in ALLOWED_PAGE_SIZES:
        return f"page size {page_size}; allowed: {ALLOWED_PAGE_SIZES}"
    if key.stride(-1) != 1:
        return "keys without unit stride along the head dim"
    return None


@on_input_device
def page_lse_triton(query: torch.Tensor, key: torch.Tensor, page_size: int, scale: float,
                    key_start: torch.Tensor | None = None, key_valid: torch.Tensor | None = None,
                    flag: torch.Tensor | None = None) -> torch.Tensor:
    """`[B, Hkv, G, n]` float32 natural-log sum of `exp(scale·q·k)` over each page's visible keys (query
    `[B, Hq, 1, D]`, key `[B, Hkv, L, D]`, `n = ceil(L / page_size)`); `-inf` for a page with none.
    `key_start` `[B]` (left padding), `key_valid` `[B, L]` bool; `flag`: see the module docstring.
    Raises ValueError on inputs the kernel declines (`unsupported_reason`)."""
    reason = unsupported_reason(query, key, page_size)
    if reason is not None:
        raise ValueError(f"page_lse_triton: {reason}")
    b, hq, _, d = query.shape
    hkv, length = key.shape[1], key.shape[2]
    group = hq // hkv
    n = num_blocks(length, page_size)
    out = torch.empty(b, hkv, group, n, dtype=torch.float32, device=query.device)
    if out.numel() == 0:
        return out
    q = query.to(key.dtype)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if key_valid is not None and (key_valid.dtype != torch.bool or key_valid.stride(-1) != 1):
        key_valid = key_valid.to(torch.bool).contiguous()
    tile = max(page_size, 64)
    tiles = -(-length // tile)
    precision = "ieee" if key.dtype == torch.float32 else "tf32"
    _page_lse_kernel[(b * hkv, triton.cdiv(tiles, TILES_PER_PROGRAM))](
        q, key, flag if flag is not None else q, key_start if key_start is not None else q,
        key_valid if key_valid is not None else q, out,
        q.stride(0), q.stride(1), key.stride(0), key.stride(1), key.stride(2),
        key_valid.stride(0) if key_valid is not None else 0,
        hkv, group, length, n, float(scale) * _LOG2E,
        PAGE=page_size, TILE=tile, TILES=TILES_PER_PROGRAM, BLOCK_G=max(16, triton.next_power_of_2(group)),
        HEAD_D=d, BLOCK_D=max(16, triton.next_power_of_2(d)), DOT_PRECISION=precision,
        HAS_FLAG=flag is not None, HAS_KEY_START=key_start is not None, HAS_KEY_VALID=key_valid is not None,
        num_warps=NUM_WARPS,
    )  # fmt: skip
    return out
