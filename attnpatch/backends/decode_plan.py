"""Tiles and splits of a split-KV decode step: what the Triton decode kernel and its PyTorch oracle
share (input checks, tile size, split count, the empty result)."""

from __future__ import annotations

import functools
import math
import os

import torch

from attnpatch.backends.inputs import KERNEL_HEAD_DIMS, qkv_reason
from attnpatch.backends.partial_state import pack_results
from attnpatch.sparsity import PageSelection, num_blocks

ALLOWED_HEAD_DIMS = KERNEL_HEAD_DIMS
ALLOWED_PAGE_SIZES = (16, 32, 64, 128)
ALLOWED_TILE_SIZES = (16, 32, 64, 128)  # tokens per tile; a multiple of the page size
MIN_DEFAULT_TILE = 64  # default tile = max(page_size, 64): loads of >= 64 rows × D
MAX_SPLITS = 64
MIN_TILES_PER_SPLIT = 2
CPU_NOMINAL_SMS = 4  # "SM count" used off-GPU (interpreter), where torch.cuda is not consulted
DTYPES = (torch.float16, torch.bfloat16, torch.float32)



def launch_override() -> tuple[int, int, int | None, int | None] | None:
    """`ATTNPATCH_DECODE_CONFIG="warps,stages"` or `"warps,stages,splits,tile"` (0 = the default rule):
    the split kernel's launch for benchmark sweeps, in place of the defaults; None when unset."""
    value = os.environ.get("ATTNPATCH_DECODE_CONFIG")
    if not value:
        return None
    try:
        fields = [int(x) for x in value.split(",")]
        if len(fields) not in (2, 4):
            raise ValueError
    except ValueError as e:
        raise ValueError("ATTNPATCH_DECODE_CONFIG must read 'warps,stages' or 'warps,stages,splits,tile' "
                         f"(e.g. '4,3' or '4,3,8,64'), got {value!r}") from e
    warps, stages, splits, tile = (*fields, 0, 0)[:4]
    return warps, stages, splits or None, tile or None


def default_tile_size(page_size: int) -> int:
    """Tokens per tile when none is given: ``max(page_size, 64)`` (or `launch_override`'s tile when it
    holds whole pages)."""
    override = launch_override()
    if override is not None and override[3] is not None and override[3] % int(page_size) == 0:
        return override[3]
    return max(int(page_size), MIN_DEFAULT_TILE)


@functools.lru_cache(maxsize=16)
def _cuda_sm_count(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return CPU_NOMINAL_SMS


def choose_num_splits(programs: int, max_tiles: int, sm_count: int) -> int:
    """Splits per KV head so that ``programs · splits`` fills about two waves of ``sm_count`` SMs.

    ``programs`` = B·Hkv, ``max_tiles`` = tiles of the longest possible page list. Each split keeps
    at least `MIN_TILES_PER_SPLIT` tiles (fewer splits also weaken skipping less), at most
    `MAX_SPLITS`. E.g. H200 (132 SMs), B=1, Hkv=8, 128 tiles (128K keys, 1/16 of the pages, tiles of
    64) → 33 splits of ≤ 4 tiles; B·Hkv ≥ 264 → 1 split (no merge).
    """
    if programs <= 0 or max_tiles <= 1:
        return 1
    want = -(-2 * max(int(sm_count), 1) // programs)
    cap = max(1, max_tiles // MIN_TILES_PER_SPLIT)
    return max(1, min(want, cap, MAX_SPLITS))


def resolve_num_splits(
    selection: PageSelection,
    device: torch.device | str,
    num_splits: int | None = None,
    tile_size: int | None = None,
) -> int:
    """The split count `sparse_decode_attention` uses for these arguments (no device sync)."""
    override = launch_override()
    if num_splits is None and override is not None and override[2] is not None:
        num_splits = override[2]
    if num_splits is not None:
        if int(num_splits) < 1:
            raise ValueError(f"num_splits must be >= 1, got {num_splits}")
        return int(num_splits)
    tile = default_tile_size(selection.page_size) if tile_size is None else int(tile_size)
    b, hkv, p = selection.indices.shape
    max_tiles = num_blocks(p, max(tile // selection.page_size, 1))
    return choose_num_splits(b * hkv, max_tiles, _sm_count(torch.device(device)))


def decode_input_reason(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    selection: PageSelection,
    tile_size: int | None = None,
) -> str | None:
    """Why these inputs cannot be planned into tiles and splits (None when they can)."""
    reason = qkv_reason(query, key, value, selection, ALLOWED_HEAD_DIMS, DTYPES, "allowed head dims",
                        one_query=True)
    if reason is not None:
        return reason
    b, hkv, lk = key.shape[0], key.shape[1], key.shape[2]
    ps = selection.page_size
    if ps not in ALLOWED_PAGE_SIZES:
        return f"page size {ps} not supported; allowed page sizes: {ALLOWED_PAGE_SIZES}"
    tile = default_tile_size(ps) if tile_size is None else tile_size
    if tile not in ALLOWED_TILE_SIZES or tile % ps:
        return f"tile size {tile} must be one of {ALLOWED_TILE_SIZES} and a multiple of the page size {ps}"
    if selection.kv_len != lk:
        return f"selection built for kv_len={selection.kv_len}; got {lk}"
    if selection.indices.dim() != 3 or tuple(selection.indices.shape[:2]) != (b, hkv):
        return f"selection indices {tuple(selection.indices.shape)} do not match [B={b}, Hkv={hkv}, P]"
    if tuple(selection.counts.shape) != (b, hkv):
        return f"selection counts {tuple(selection.counts.shape)} do not match [B={b}, Hkv={hkv}]"
    return None


def check_decode(query, key, value, selection, scale, tile_size, num_splits, name: str,
                 reason: str | None = None) -> tuple[float, int, int]:
    """`(scale, tile, splits)` for these inputs, or ValueError prefixed with `name` (`reason`: a
    caller's own reason to refuse, checked first)."""
    reason = reason or decode_input_reason(query, key, value, selection, tile_size)
    if reason is not None:
        raise ValueError(f"{name}: {reason}")
    d = query.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    tile = default_tile_size(selection.page_size) if tile_size is None else int(tile_size)
    splits = resolve_num_splits(selection, query.device, num_splits, tile)
    return scale, tile, splits


def empty_result(query, value, return_lse, count_tiles):
    b, hq, _, _ = query.shape
    out = torch.zeros(b, hq, 1, value.shape[-1], dtype=query.dtype, device=query.device)
    lse = (
        torch.full((b, hq, 1), float("-inf"), dtype=torch.float32, device=query.device)
        if return_lse
        else None
    )
    zero = torch.zeros((), dtype=torch.int64, device=query.device)
    return pack_results(out, lse, (zero, zero.clone()) if count_tiles else None)
