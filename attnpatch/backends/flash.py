"""flash-attn-4 (CuTe DSL, `flash_attn.cute`) backend: dense causal and block-sparse prefill.

`flash_prefill` computes what `attnpatch.backends.reference.block_sparse_attention` computes, on
flash-attn-4's forward kernel (Hopper SM90, Blackwell SM100). Everything below was read from the
4.0.0b36 wheel (`flash_attn/cute/interface.py`, `block_sparsity.py`, `block_sparse_utils.py`,
`flash_fwd_sm90.py`, `mask.py`, `softmax.py`); `flash_attn` is imported lazily, so this module
imports on machines without it.

Semantics (same as the reference): query `i` sits at absolute position `p = Lk - Lq + i`; key `j` is
visible iff `j <= p`, `j >= key_start[b]` (left padding) and, with `window`, `p - j < window`
(transformers' sliding-window rule). With a selection only the listed key blocks of each query block
are computed. Rows that see no key give output 0 and LSE `-inf`.

How it maps onto fa4:

* Layout: fa4 takes BSHD; `[B, H, L, D]` inputs are passed as `transpose(1, 2)` views (no copy when
  they came from transformers' `view(B, L, H, D).transpose(1, 2)`), K/V are never repeated (fa4 does
  GQA itself; with a head-shared selection it packs the G query heads of a KV head into one tile).
* Causality: fa4's causal mask is bottom-right aligned (`mask.py`: column limit
  `row + 1 + seqlen_k - seqlen_q`), i.e. the same `Lk - Lq` offset as ours.
* Sliding window: `window_size=(window - 1, 0)` with `causal=True` (fa4's local mask keeps
  `p - window_left <= j <= p`).
* Dense without padding: `flash_attn_func(causal=True[, window_size])`.
* Block sparsity: `BlockSparseTensorsTorch(mask_block_cnt [B|1, H|1, R] int32, mask_block_idx
  [B|1, H|1, R, W] int32, full_block_cnt, full_block_idx, block_size=(block_q, block_k))`. For each
  query block the kernel visits the "mask" list and then the "full" list, each from its last entry
  down to its first; mask blocks get the mask, full blocks none. `selection_to_block_sparse` splits
  the selection's blocks into FULL (no mask needed: inside Lk, on or below the causal diagonal of the
  query block's *first* row, no key before `key_start[b]`, inside the window of *every* row),
  PARTIAL (some but not all pairs visible) and dropped (no visible pair at all: exact to skip).
  Lists stay ascending: fa4 applies the `seqlen_k` bound only to the first block it visits (the
  highest index), which is where the ragged last key block sits.
* Masking of partial blocks, two modes (`masking=`):

  - `"mask_mod"` (default): `causal=False` plus a CuTe `mask_mod` that evaluates causal, window and
    padding on partial blocks only (the combination fa4's own block-sparsity tests exercise).
  - `"causal"`: fa4's built-in causal / local masks (R2P bit masks, cheaper) with block sparsity; no
    padding possible. Not covered by fa4's own tests: `attnpatch.bench.flash_check` checks it.

* Left padding (`key_start`): fa4 has no per-batch "first key" argument (`seqused_k` bounds keys on
  the right; `cu_seqlens_k` would shift the key blocks off the selection's grid), so padding always
  goes through the `mask_mod` mode with `key_start` as an int32 aux tensor `[B]` read by the
  mask_mod; blocks holding padding are PARTIAL, blocks entirely in padding are dropped. Dense prefill
  with padding runs as a block-sparse call over every causal block (`BlockSelection.causal`, stride-0,
  no memory) at fa4's own tile size.
* LSE: fa4 returns the natural-log LSE `[B, H, Lq]` float32 (`softmax.py`, `finalize`: base-2 sum
  times ln 2), `-inf` for rows with no key (their output is 0).

Tile rules (declined in `unsupported_reason` otherwise; `interface.py` `_tile_size_fwd_sm90`,
`_fit_sm90_fwd_tile_to_block_sparsity`, `_get_fwd_config`; `block_sparsity.py`
`normalize_block_sparse_config`):

* SM90: tile `(128, 128)` for head dim 65..128, `(192, 128)` for <= 64 when `block_q % 192 == 0`
  else `(128, 128)`, `(128, 80)` for 256 (`(128, 64)` with a local mask). fa4 shrinks `tile_m` to
  64 when `block_q % tile_m != 0` and `block_q % 64 == 0`, and `tile_n` to `block_k` when
  `block_k < tile_n`; then `block_q % tile_m == 0` and `block_k == tile_n` are required (no KV
  sub-tiles on SM90). This module accepts `block_k` in {64, 128} only (the tile widths fa4 uses
  itself) and `block_q` a multiple of 64.
* SM100: tile `(128, 128)`, two Q tiles per CTA (`q_stage=2`) whenever `Lq·G' > 128` (`G'` the
  packed GQA factor) and head dim 256 is not used: `block_q` must be a multiple of
  `128 · q_stage` and `block_k` a multiple of 128. Block-sparse head dim 256 on SM100 is declined.

Cost of the conversion: the lists are built on the selection's device, either by ~25 small PyTorch
kernels (launch-bound: roughly 0.1-0.2 ms of host time whatever the density) or, on CUDA with Triton,
by one kernel (`attnpatch.backends.triton.flash_lists`, identical output). Per-row thresholds on the
key-block index make the classification a few comparisons per selected block.

Host syncs: none in `selection_to_block_sparse` or `flash_prefill` (shapes come from the selection's
shapes, never from its values; a selection on the CPU is copied to the GPU first, which is the only
host-side wait). fa4 itself compiles one kernel per new compile key (2.5-4.5 s per kind of call).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from attnpatch.backends.base import Backend
from attnpatch.sparsity import BlockSelection, KeyBounds, num_blocks
from attnpatch.sparsity.split import classify_slots, compact

__all__ = [
    "FlashBackend",
    "FlashBlockSparse",
    "flash_prefill",
    "flash_unavailable_reason",
    "input_reason",
    "native_block_size",
    "selection_to_block_sparse",
    "unsupported_reason",
]

MASKING_MODES = ("mask_mod", "causal")
# Key-block widths this module hands to the SM90 kernel (the tile widths fa4 picks itself).
_SM90_BLOCK_K = (64, 128)


class FlashBlockSparse(NamedTuple):
    """fa4's forward block-sparse lists (what `BlockSparseTensorsTorch` carries), built without fa4.

    Counts `[B|1, H|1, R]` int32, indices `[B|1, H|1, R, W]` int32 (W <= number of key blocks, last
    dim contiguous), entries `< count` ascending; dims of size 1 broadcast in fa4.
    """

    mask_block_cnt: torch.Tensor
    mask_block_idx: torch.Tensor
    full_block_cnt: torch.Tensor
    full_block_idx: torch.Tensor
    block_size: tuple[int, int]

    def to_fa4(self):
        from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

        return BlockSparseTensorsTorch(
            mask_block_cnt=self.mask_block_cnt,
            mask_block_idx=self.mask_block_idx,
            full_block_cnt=self.full_block_cnt,
            full_block_idx=self.full_block_idx,
            block_size=self.block_size,
        )


# ----------------------------------------------------------------------------------------------
# Availability and input checks
# ----------------------------------------------------------------------------------------------


@functools.cache
def _import_error() -> str | None:
    try:
        import flash_attn.cute  # noqa: F401
        from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch  # noqa: F401
    except Exception as e:  # ImportError, or a CUDA/cutlass error raised while importing
        return f"flash_attn.cute (flash-attn-4) does not import: {type(e).__name__}: {e}"
    return None


def _arch(device: torch.device) -> int:
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


def flash_unavailable_reason(device) -> str | None:
    """None when flash-attn-4 can run on `device` (CUDA, compute capability 9.x or 10.x), else why not."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"flash-attn-4 needs a CUDA device, got {device.type}"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    major = _arch(device) // 10
    if major not in (9, 10):
        return f"flash-attn-4 block-sparse forward needs SM90 or SM100 (compute capability 9.x/10.x), got {major}.x"
    return _import_error()


def native_block_size(arch: int, head_dim: int, q_len: int, packed_group: int = 1) -> tuple[int, int]:
    """The (block_q, block_k) of fa4's own tiles; used for dense prefill with padding."""
    if arch // 10 == 9:
        return 128, (64 if head_dim > 128 else 128)
    q_stage = 2 if q_len * packed_group > 128 and head_dim != 256 else 1
    return 128 * q_stage, 128


def _sm90_tiles(head_dim: int, block_q: int, block_k: int, causal_or_local: bool, local: bool) -> tuple[int, int]:
    """fa4's SM90 forward tile for a block-sparse call (interface.py: _tile_size_fwd_sm90, then
    _fit_sm90_fwd_tile_to_block_sparsity), with head_dim_v == head_dim."""
    if head_dim <= 96:
        tile_m = 192 if block_q % 192 == 0 else 128
        tile_n = 144 if head_dim > 64 and tile_m == 192 and not causal_or_local else 128
    elif head_dim <= 128:
        tile_m, tile_n = 128, 128
    elif head_dim <= 192:
        tile_m, tile_n = 128, (96 if local else 112)
    else:
        tile_m, tile_n = 128, (64 if local else 80)
    if block_q % tile_m != 0 and block_q % 64 == 0:
        tile_m = 64
    if block_k < tile_n and block_k % 16 == 0:
        tile_n = block_k
    return tile_m, tile_n


def _block_reason(arch: int, head_dim: int, block_q: int, block_k: int, q_len: int, packed_group: int,
                  causal_or_local: bool = False, local: bool = False) -> str | None:
    """Why fa4 cannot take sparse blocks (block_q, block_k) exactly, or None."""
    if arch // 10 == 9:
        if block_k not in _SM90_BLOCK_K:
            return f"SM90 fa4 needs block_k in {_SM90_BLOCK_K} (its key tile; no KV sub-tiles), got {block_k}"
        tile_m, tile_n = _sm90_tiles(head_dim, block_q, block_k, causal_or_local, local)
        if block_k != tile_n:
            return f"SM90 fa4 uses a {tile_n}-key tile for head dim {head_dim}; block_k={block_k} must equal it"
        if block_q % tile_m:
            return f"SM90 fa4 needs block_q a multiple of its {tile_m}-row tile (of 64), got {block_q}"
        return None
    if head_dim > 128:
        return f"block-sparse fa4 on SM100 is limited here to head dim <= 128, got {head_dim}"
    q_stage = 2 if q_len * packed_group > 128 else 1
    if block_k % 128:
        return f"SM100 fa4 needs block_k a multiple of 128 (its key tile), got {block_k}"
    if block_q % (128 * q_stage):
        return (f"SM100 fa4 needs block_q a multiple of {128 * q_stage} ({q_stage} Q tiles of 128 per CTA), "
                f"got {block_q}")
    return None


def _head_dim_reason(arch: int, d: int, dv: int) -> str | None:
    if d != dv:
        return f"head dims of K ({d}) and V ({dv}) differ"
    if d % 8:
        return f"head dim {d} must be a multiple of 8 (16-byte rows)"
    if arch // 10 == 9 and not 8 <= d <= 256:
        return f"SM90 fa4 takes head dims 8..256, got {d}"
    if arch // 10 == 10 and not (8 <= d <= 128 or d == 256):
        return f"SM100 fa4 takes head dims 8..128 or 256, got {d}"
    return None


def _is_shared(t: torch.Tensor, dim: int) -> bool:
    return t.shape[dim] == 1 or t.stride(dim) == 0


def unsupported_reason(query, key, value, selection=None, key_start=None, window=None,
                       masking: str = "mask_mod") -> str | None:
    """Why `flash_prefill` cannot compute this input exactly (the caller then falls back), or None."""
    reason = flash_unavailable_reason(query.device)
    if reason is not None:
        return reason
    return input_reason(query, key, value, selection, key_start, window, masking, arch=_arch(query.device))


def input_reason(query, key, value, selection=None, key_start=None, window=None, masking: str = "mask_mod",
                 *, arch: int) -> str | None:
    """`unsupported_reason` less the device checks, for compute capability `arch` (90, 100, ...)."""
    if arch // 10 not in (9, 10):
        return f"flash-attn-4 block-sparse forward needs SM90 or SM100, got arch {arch}"
    if masking not in MASKING_MODES:
        return f"unknown masking mode {masking!r}; allowed: {', '.join(MASKING_MODES)}"
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return "query/key/value must be 4D [B, H, L, D]"
    if query.dtype not in (torch.float16, torch.bfloat16):
        return f"fa4 takes float16/bfloat16 (fp8 only on SM100, not wired), got {query.dtype}"
    if key.dtype != query.dtype or value.dtype != query.dtype:
        return f"query/key/value dtypes differ ({query.dtype}, {key.dtype}, {value.dtype})"
    if key.device != query.device or value.device != query.device:
        return "query/key/value are on different devices"
    b, hq, lq, d = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    if tuple(value.shape[:3]) != (b, hkv, lk) or key.shape[0] != b or key.shape[3] != d:
        return f"key/value shapes {tuple(key.shape)}, {tuple(value.shape)} do not match query {tuple(query.shape)}"
    if hq % hkv:
        return f"query heads ({hq}) must be a multiple of key/value heads ({hkv})"
    if lq > lk:
        return f"queries ({lq}) must not outnumber keys ({lk}): queries are aligned to the end of the keys"
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        return "backward is not wired for fa4 here (forward only)"
    reason = _head_dim_reason(arch, d, value.shape[3])
    if reason is not None:
        return reason
    if window is not None and (not isinstance(window, int) or window < 1):
        return f"window must be a positive int, got {window!r}"
    if key_start is not None:
        if not isinstance(key_start, torch.Tensor) or tuple(key_start.shape) != (b,):
            return f"key_start must be an integer tensor [B={b}]"
        if key_start.dtype.is_floating_point or key_start.dtype == torch.bool:
            return f"key_start must be an integer tensor, got {key_start.dtype}"
    native = masking == "causal" and key_start is None  # fa4's own causal/local masks
    if selection is None:
        if key_start is None:
            return None
        bq, bk = native_block_size(arch, d, lq, hq // hkv)  # padding: every causal block, mask_mod
        return _block_reason(arch, d, bq, bk, lq, hq // hkv)
    if not isinstance(selection, BlockSelection):
        return f"fa4 executes block selections only, not {type(selection).__name__}"
    if selection.skip is not None:
        return "fa4 has no skip-threshold (BLASST) mode"
    if (selection.q_len, selection.kv_len) != (lq, lk):
        return f"selection built for q_len={selection.q_len}, kv_len={selection.kv_len}; got {lq}, {lk}"
    sb, sh = selection.counts.shape[:2]
    if sb != b or sh != hq:
        return f"selection has batch×heads {sb}×{sh}, query has {b}×{hq}"
    if selection.indices.dim() != 4 or selection.indices.shape[2] != num_blocks(lq, selection.block_q):
        return "selection indices must be [B, H, R, K] with R query blocks"
    shared = _is_shared(selection.indices, 1) and _is_shared(selection.counts, 1)
    packed = hq // hkv if shared else 1
    return _block_reason(arch, d, selection.block_q, selection.block_k, lq, packed,
                         causal_or_local=native, local=native and window is not None)


# ----------------------------------------------------------------------------------------------
# Selection -> fa4 block-sparse lists
# ----------------------------------------------------------------------------------------------


def _torch_lists(indices, counts, key_start, window, bq, bk, lq, lk, width):
    """The lists through the one full/partial split (`attnpatch.sparsity.split`), in PyTorch."""
    visible, full = classify_slots(indices, counts, bq, bk, lq, lk, KeyBounds(key_start=key_start, window=window))
    f_cnt, f_idx = compact(indices, full, width)
    m_cnt, m_idx = compact(indices, visible & ~full, width)
    return m_cnt, m_idx, f_cnt, f_idx


def selection_to_block_sparse(
    selection: BlockSelection,
    key_start: torch.Tensor | None = None,
    window: int | None = None,
    *,
    device=None,
    impl: str = "auto",
) -> FlashBlockSparse:
    """fa4's mask/full block lists for `selection` (exact; see the module docstring for the classes).

    Tensor ops only, O(B·H·R·K) memory, no host sync. A selection shared by all heads (stride 0 or
    size 1 on dim 1) gives head dim 1 (fa4 broadcasts it, and can then pack GQA); shared by the whole
    batch without `key_start`, batch dim 1. `device`: where to build the lists (default: the
    selection's device). `impl`: "torch" (~25 small kernels), "triton" (one kernel,
    `attnpatch.backends.triton.flash_lists`) or "auto" (Triton when it can run on that device).
    Both give identical tensors.
    """
    if impl not in ("auto", "torch", "triton"):
        raise ValueError(f"impl must be auto, torch or triton, got {impl!r}")
    bq, bk = selection.block_q, selection.block_k
    lq, lk = selection.q_len, selection.kv_len
    indices, counts = selection.indices, selection.counts
    if device is not None:
        indices, counts = indices.to(device, non_blocking=True), counts.to(device, non_blocking=True)
    if _is_shared(indices, 1) and _is_shared(counts, 1):
        indices, counts = indices[:, :1], counts[:, :1]
    if key_start is None and _is_shared(indices, 0) and _is_shared(counts, 0):
        indices, counts = indices[:1], counts[:1]
    if indices.shape[-1] == 0:  # no slot at all: one empty slot so fa4 gets lists at least 1 wide
        indices = indices.new_zeros(*indices.shape[:-1], 1)
        counts = torch.zeros_like(counts)
    if key_start is not None:
        key_start = key_start.to(device=indices.device, dtype=torch.int32).contiguous()
    width = max(1, min(indices.shape[-1], num_blocks(lk, bk)))
    use_triton = impl == "triton"
    if impl == "auto" and indices.is_cuda:
        from attnpatch.backends.triton.flash_lists import can_run

        use_triton = can_run(indices)
    if use_triton:
        from attnpatch.backends.triton.flash_lists import build_lists

        out_batch = key_start.shape[0] if key_start is not None else indices.shape[0]
        lists = build_lists(indices, counts, key_start, window, bq, bk, lq, lk, out_batch, width)
    else:
        lists = _torch_lists(indices, counts, key_start, window, bq, bk, lq, lk, width)
    return FlashBlockSparse(*lists, (bq, bk))


# ----------------------------------------------------------------------------------------------
# The call
# ----------------------------------------------------------------------------------------------


def flash_prefill(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    selection: BlockSelection | None = None,
    *,
    scale: float | None = None,
    key_start: torch.Tensor | None = None,
    window: int | None = None,
    return_lse: bool = False,
    masking: str = "mask_mod",
    block_sparse: FlashBlockSparse | None = None,
):
    """Causal (block-sparse) prefill on flash-attn-4; same contract as the reference executor.

    query `[B, Hq, Lq, D]`, key/value `[B, Hkv, Lk, D]` (GQA, not repeated). `selection=None`: dense
    causal. `key_start` int `[B]`: first real key per row (left padding). `window`: sliding window
    (`p - j < window`). Returns `[B, Hq, Lq, D]` (a transposed view of fa4's BSHD output) and, with
    `return_lse`, the natural-log LSE `[B, Hq, Lq]` float32. `masking`: see the module docstring.
    `block_sparse`: lists already built by `selection_to_block_sparse` for the same selection,
    key_start and window (lets a caller convert once for several layers, or time the parts).
    Raises ValueError with `unsupported_reason`'s text for inputs it cannot take.
    """
    reason = unsupported_reason(query, key, value, selection, key_start, window, masking)
    if reason is not None:
        raise ValueError(reason)
    from flash_attn.cute import flash_attn_func

    b, hq, lq, d = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    kwargs = {"softmax_scale": scale, "return_lse": return_lse}
    with torch.cuda.device(query.device):
        if selection is None and key_start is None and block_sparse is None:
            kwargs.update(causal=True, window_size=(window - 1, 0) if window is not None else (None, None))
            out, lse = flash_attn_func(q, k, v, **kwargs)
        else:
            if block_sparse is None:
                if selection is None:
                    bq, bk = native_block_size(_arch(query.device), d, lq, hq // hkv)
                    selection = BlockSelection.causal(b, hq, lq, lk, bq, bk, device=query.device)
                block_sparse = selection_to_block_sparse(selection, key_start, window, device=query.device)
            if masking == "mask_mod" or key_start is not None:
                padded = key_start is not None
                from attnpatch.backends.flash_mask_mods import mask_mod

                kwargs.update(causal=False, mask_mod=mask_mod(window, padded))
                if padded:
                    kwargs["aux_tensors"] = [key_start.to(device=query.device, dtype=torch.int32).contiguous()]
            else:
                kwargs.update(causal=True, window_size=(window - 1, 0) if window is not None else (None, None))
            out, lse = flash_attn_func(q, k, v, block_sparse_tensors=block_sparse.to_fa4(), **kwargs)
    out = out.transpose(1, 2)
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------------------------
# The backend
# ----------------------------------------------------------------------------------------------


def _bounds_args(bounds: KeyBounds) -> tuple[torch.Tensor | None, int | None, str | None]:
    if bounds.mask is not None:
        return None, None, "the attention mask is not causal + left padding + window"
    if bounds.key_valid is not None:
        return None, None, "padding that is not left padding (fa4 takes a first real key per row)"
    return bounds.key_start, bounds.window, None


class FlashBackend(Backend):
    """flash-attn-4 prefill: block selections and (when asked for explicitly) dense causal."""

    name = "flash"
    description = "flash-attn-4 (CuTe DSL) block-sparse and dense causal prefill, SM90 / SM100"

    def unavailable(self, device: torch.device) -> str | None:
        return flash_unavailable_reason(device)

    def prefill_reason(self, query, key, value, selection, bounds):
        key_start, window, why = _bounds_args(bounds)
        return why or unsupported_reason(query, key, value, selection, key_start, window)

    def prefill(self, query, key, value, selection, *, scale, bounds, tile_counts=None):
        key_start, window, _ = _bounds_args(bounds)
        out = flash_prefill(query, key, value, selection, scale=scale, key_start=key_start, window=window)
        if tile_counts is not None:
            tile_counts[0] += selection.counts.sum()
        return out

    def dense_reason(self, query, key, value, bounds):
        key_start, window, why = _bounds_args(bounds)
        return why or unsupported_reason(query, key, value, None, key_start, window)

    def dense(self, query, key, value, *, scale, bounds):
        key_start, window, _ = _bounds_args(bounds)
        return flash_prefill(query, key, value, None, scale=scale, key_start=key_start, window=window)
