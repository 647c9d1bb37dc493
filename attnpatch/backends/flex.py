"""FlexAttention backend that executes a `BlockSelection` exactly like the reference executor.

`flex_block_sparse_attention` takes the same arguments as
`attnpatch.backends.reference.block_sparse_attention` and computes the same thing: every query block
attends, under the causal rule with queries aligned to the end of the keys (offset `Lk - Lq`), to
exactly the key blocks its selection lists. Benchmarks that swap one for the other therefore compare
like for like.

How the selection becomes a flex `BlockMask` (`selection_to_block_mask`):

* One `BLOCK_SIZE = (block_q, block_k)` pair; `block_q != block_k` is allowed.
* Every selected block is classified from the R×K index lists with tensor ops (no Python loop over
  blocks, no Lq×Lk tensor):

  - FULL / PARTIAL: the one split of `attnpatch.sparsity.split.full_slots` (a FULL block lies
    inside `Lk`, on or below the causal diagonal of its query block's first row, inside the
    sliding window of its last row, and holds no padding). FULL blocks are computed without
    evaluating `mask_mod`; only PARTIAL ones evaluate it.

* `mask_mod(b, h, q, kv) = kv <= q + (Lk - Lq) and kv < Lk [and q + (Lk - Lq) - kv < window]
  [and key_valid[b, kv]]`.
* The two lists are compacted (order kept ascending) into `[B, H, R, W]` int32 tensors with
  `W = min(C, next_pow2(K))` (C = number of key blocks) on GPU: O(R·K), never O(R·C) at long
  context. Rounding K up to a power of two bounds the number of distinct shapes the compiled kernel
  sees (fewer recompiles). Lists are C wide (flex's own convention) where narrower ones are not
  accepted: on CPU (the C++ flex lowering asserts `W · block_k >= Lk`), when the backward's Q-side
  metadata is built (flex transposes through an R×C table sized by W), and on torch without exact
  lengths (see below). Entries past a row's count are 0 (the kernel reads the first entry of
  every list, even an empty one, so W >= 1). A selection shared by all
  heads (stride 0 over heads, as the reference detects) becomes a one-head BlockMask that flex
  broadcasts over heads.

Ragged lengths: when `BlockMask.from_kv_blocks` accepts `seq_lengths` and `compute_q_blocks`
(detected at import; both exist in the torch 2.13 dev environment), the mask is
built for the exact `(Lq, Lk)` and Q/K/V are passed unpadded; the kernel masks rows ≥ Lq and keys
≥ Lk itself (the ragged last key block is PARTIAL anyway). Q-side metadata (`q_indices`, only read
by the backward pass) is skipped unless gradients are needed. On older torch the index lists are
C wide (flex derives the lengths from the index shape and transposes R×C), Q/K/V are zero-padded to
block multiples and the output is sliced back; `mask_mod` keeps the padded keys out.

Padding and windows come in closed form (`bounds`: first real key per row, per-key validity,
sliding window). A tensor `mask` is also taken when it is of the form "causal AND key_valid[b, kv]"
(left or right padding, shape `[B, 1, Lq, Lk]`, boolean). `key_valid` is read off
the last query row (which sees every key causally) and the whole mask is checked against it on the
causally visible positions (streamed in row chunks, no Lq×Lk temporary); any other mask, including
a mask whose fully padded rows were "unmasked" for SDPA, raises ValueError so the caller can fall
back to the reference executor.

Log-sum-exp: the public `flex_attention` returns the natural-log LSE, so no conversion is done here
(torch 2.13 source: the Triton kernel stores base-2 LSE and the public function multiplies by ln 2
unless the FLASH backend, which is natural-log already, ran; the eager path divides its natural-log
LSE by ln 2 first so that conversion is uniform). The LSE is requested through
`return_aux=AuxRequest(lse=True)` where available (`return_lse` is deprecated), else `return_lse`.
The tests check it against the reference numerically (eager); on the torch 2.11 GPU build a
numerical check against the reference is still needed. Rows that see no key get output 0 and LSE
`-inf` from flex itself (eager:
safe softmax; Triton: `l_i` of masked rows set to 1 over an all-zero accumulator), as in the reference.

Eager (`compile=False`) flex evaluates `mask_mod` densely over all Lq×Lk positions and ignores the
block lists; for that path `mask_mod` additionally looks the pair up in the R×C selection table so
the result is still exact (tests and tiny sizes only). The compiled path reads the block lists and
uses the minimal `mask_mod` above.
"""

from __future__ import annotations

import functools
import inspect
import math

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from attnpatch.backends.base import Backend
from attnpatch.backends.inputs import pad_to
from attnpatch.sparsity import BlockSelection, KeyBounds, TokenSelection, num_blocks
from attnpatch.sparsity.bounds import padding_key_validity
from attnpatch.sparsity.split import compact, full_slots

__all__ = [
    "FlexBackend",
    "flex_block_sparse_attention",
    "selection_to_block_mask",
]

_FROM_KV_PARAMS = inspect.signature(BlockMask.from_kv_blocks).parameters
# Exact (unpadded) lengths need both: seq_lengths to state them, compute_q_blocks=False so the index
# lists may be narrower than the number of key blocks (the Q-side transpose assumes C-wide lists).
_EXACT_LENGTHS = "seq_lengths" in _FROM_KV_PARAMS and "compute_q_blocks" in _FROM_KV_PARAMS
_HAS_RETURN_AUX = "return_aux" in inspect.signature(flex_attention).parameters

# Recompile budget for the compiled flex call: dynamic=False compiles once per shape signature, and
# dynamo's default limit (8) would silently fall back to eager flex, which materialises Lq×Lk scores.
_RECOMPILE_LIMIT = 64
# Elements per chunk when checking a padding mask (bounds the temporaries to ~64 MiB).
_MASK_CHECK_ELEMS = 1 << 26


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _mask_mod(offset: int, kv_len: int, key_valid: torch.Tensor | None, window: int | None,
              table: torch.Tensor | None, bq: int, bk: int):
    """The causal (+ window + padding [+ selection table]) predicate flex evaluates on partial blocks."""
    no_window = window is None
    win = 0 if window is None else int(window)
    no_valid = key_valid is None
    no_table = table is None

    def mask_mod(b, h, q_idx, kv_idx):
        keep = (kv_idx <= q_idx + offset) & (kv_idx < kv_len)
        if not no_window:
            keep = keep & (q_idx + offset - kv_idx < win)
        if not no_valid:
            keep = keep & key_valid[b, kv_idx]
        if not no_table:
            keep = keep & table[b, h, q_idx // bq, kv_idx // bk]
        return keep

    return mask_mod


def selection_to_block_mask(
    selection: BlockSelection,
    key_valid: torch.Tensor | None = None,
    *,
    window: int | None = None,
    encode_selection: bool = False,
    with_q_blocks: bool = False,
    exact_lengths: bool | None = None,
    compact_lists: bool | None = None,
) -> BlockMask:
    """Flex `BlockMask` that visits exactly the blocks of `selection` (FULL / PARTIAL split).

    `key_valid`: optional boolean `[B, kv_len]`; blocks holding an invalid key become PARTIAL and
    `mask_mod` drops those keys. `window`: a sliding window (blocks not entirely inside every row's
    window become PARTIAL). `encode_selection`: also test block
    membership inside `mask_mod` through the `[B, H, R, C]` block table, which eager flex needs (it
    ignores the block lists); leave it off for the compiled kernel. `with_q_blocks`: build the
    Q-side metadata the backward pass reads (C-wide lists). `exact_lengths`: build for the exact
    `(q_len, kv_len)` (default: whenever torch supports it); otherwise the mask covers
    `(R·block_q, C·block_k)` and the caller must pad Q/K/V. `compact_lists`: index lists
    `min(C, next_pow2(K))` wide instead of C wide (default: whenever allowed and not on CPU, whose
    compiled flex needs C-wide lists). Memory: O(B·H·R·W) ints, never Lq×Lk.
    """
    exact = _EXACT_LENGTHS if exact_lengths is None else exact_lengths
    if exact and not _EXACT_LENGTHS:
        raise ValueError("this torch's BlockMask.from_kv_blocks cannot take exact sequence lengths")
    bq, bk = selection.block_q, selection.block_k
    lq, lk = selection.q_len, selection.kv_len
    n_qb, n_kb = num_blocks(lq, bq), num_blocks(lk, bk)
    offset = lk - lq
    indices, counts = selection.indices, selection.counts
    shared = indices.stride(1) == 0 and counts.stride(1) == 0
    if shared:  # one head's lists, broadcast by flex over the query heads
        indices, counts = indices[:, :1], counts[:, :1]
    b, _, r, k = indices.shape
    if r != n_qb:
        raise ValueError(f"selection has {r} query blocks, q_len={lq} with block {bq} needs {n_qb}")
    device = indices.device

    idx = indices.long().clamp(0, max(n_kb - 1, 0))
    kept = torch.arange(k, device=device) < counts.unsqueeze(-1)
    kv_pad = None
    if key_valid is not None:
        if tuple(key_valid.shape) != (b, lk) or key_valid.dtype != torch.bool:
            raise ValueError(
                f"key_valid must be boolean [{b}, {lk}], got {tuple(key_valid.shape)} {key_valid.dtype}"
            )
        # Padded with False to C·block_k so mask_mod may index any key of any block.
        kv_pad = torch.zeros(b, n_kb * bk, dtype=torch.bool, device=device)
        kv_pad[:, :lk] = key_valid
    full = full_slots(idx, counts, bq, bk, lq, lk, KeyBounds(window=window, key_valid=key_valid))
    partial = kept & ~full

    can_compact = exact and not with_q_blocks
    if compact_lists and not can_compact:
        raise ValueError("compact index lists need exact lengths and no Q-side metadata")
    narrow = (can_compact and device.type != "cpu") if compact_lists is None else compact_lists
    width = max(1, min(n_kb, _next_pow2(k)) if narrow else n_kb)
    p_cnt, p_idx = compact(idx, partial, width)
    f_cnt, f_idx = compact(idx, full, width)

    table = selection.to_block_mask() if encode_selection else None
    mask_mod = _mask_mod(offset, lk, kv_pad, window, table, bq, bk)
    kwargs = {}
    if exact:
        kwargs = {"seq_lengths": (lq, lk), "compute_q_blocks": with_q_blocks}
    return BlockMask.from_kv_blocks(
        p_cnt, p_idx, f_cnt, f_idx, BLOCK_SIZE=(bq, bk), mask_mod=mask_mod, **kwargs
    )


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def _recompile_limit_patch():
    import torch._dynamo.config as dynamo_config

    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    return dynamo_config.patch({name: max(getattr(dynamo_config, name), _RECOMPILE_LIMIT)})


def flex_block_sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    selection: BlockSelection,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
    return_lse: bool = False,
    compile: bool = True,
    *,
    check_mask: bool = True,
    bounds: KeyBounds | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse causal attention through FlexAttention; same contract as the reference.

    query `[B, Hq, Lq, D]`, key/value `[B, Hkv, Lk, D]` (GQA through `enable_gqa`, K/V never
    repeated). `mask`: optional boolean `[B, 1, Lq, Lk]` padding mask (left/right padding only, see
    `padding_key_validity`; `check_mask=False` skips its O(Lq·Lk) consistency check and host sync).
    Returns `[B, Hq, Lq, Dv]` in the query dtype and, on request, the natural-log LSE `[B, Hq, Lq]`
    (float32, `-inf` for rows that see no key; their output is 0).

    `compile=True` runs `torch.compile(flex_attention, dynamic=False)` (cached per process; one
    compilation per shape signature). `compile=False` runs eager flex, which materialises the
    Lq×Lk scores: tests and tiny inputs only. On CPU flex has no backward at all and compiled
    flex no `return_lse` (torch limitations); use `compile=False` there for the LSE. When gradients
    are requested (GPU) the BlockMask also carries the Q-side lists the backward reads.
    """
    b, hq, lq, d = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    if (selection.q_len, selection.kv_len) != (lq, lk):
        raise ValueError(
            f"selection built for q_len={selection.q_len}, kv_len={selection.kv_len}; got {lq}, {lk}"
        )
    sb, sh = selection.counts.shape[:2]
    if sb != b or sh != hq:
        raise ValueError(f"selection has batch×heads {sb}×{sh}, query has {b}×{hq}")
    if getattr(selection, "skip", None) is not None:
        raise ValueError("FlexAttention has no skip-threshold (BLASST) mode; use the reference executor")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    key_valid, window = None, None
    if bounds is not None:
        if bounds.mask is not None:
            raise ValueError("FlexAttention takes padding and windows in closed form, not a tensor mask")
        window = bounds.window
        if bounds.key_valid is not None:
            key_valid = bounds.key_valid.bool()
        elif bounds.key_start is not None:
            key_valid = torch.arange(lk, device=query.device) >= bounds.key_start.to(query.device).view(-1, 1)
    if mask is not None:
        if key_valid is not None:
            raise ValueError("pass padding either as `mask` or in `bounds`, not both")
        key_valid = padding_key_validity(mask, lq, lk, check=check_mask)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))

    block_mask = selection_to_block_mask(
        selection, key_valid, window=window, encode_selection=not compile, with_q_blocks=needs_grad
    )
    mq, mk = block_mask.shape[-2:]
    q, k, v = pad_to(query, mq), pad_to(key, mk), pad_to(value, mk)  # no-op with exact lengths

    kwargs = {"block_mask": block_mask, "scale": scale, "enable_gqa": hq != hkv}
    if compile and query.is_cuda and min(selection.block_q, selection.block_k) < 128:
        # The compiled kernel's default tiles (128 on Hopper) must divide the selection's blocks.
        kwargs["kernel_options"] = {"BLOCK_M": min(selection.block_q, 128), "BLOCK_N": min(selection.block_k, 128)}
    if return_lse:
        if _HAS_RETURN_AUX:
            from torch.nn.attention.flex_attention import AuxRequest

            kwargs["return_aux"] = AuxRequest(lse=True)
        else:
            kwargs["return_lse"] = True
    if compile:
        with _recompile_limit_patch():
            result = _compiled_flex()(q, k, v, **kwargs)
    else:
        result = flex_attention(q, k, v, **kwargs)

    if not return_lse:
        return result[:, :, :lq]
    out, aux = result
    lse = aux.lse if _HAS_RETURN_AUX else aux
    return out[:, :, :lq], lse[:, :, :lq].float()


class FlexBackend(Backend):
    """FlexAttention on the same block selection (compiled per shape signature on CUDA)."""

    name = "flex"
    description = "torch FlexAttention on the same block selection; recompiles per sequence length"

    def unavailable(self, device: torch.device) -> str | None:
        return None

    def prefill_reason(self, query, key, value, selection, bounds):
        if isinstance(selection, TokenSelection):
            return "token selections (FlexAttention runs block selections)"
        if selection.skip is not None:
            return "skip rules (FlexAttention has no skip-threshold mode)"
        if bounds.mask is not None:
            return "the attention mask is not causal + padding + window"
        if query.shape[1] % key.shape[1]:
            return f"query heads ({query.shape[1]}) must be a multiple of key/value heads ({key.shape[1]})"
        return None

    def prefill(self, query, key, value, selection, *, scale, bounds, tile_counts=None):
        out = flex_block_sparse_attention(query, key, value, selection, scale=scale, bounds=bounds,
                                          compile=query.is_cuda)
        if tile_counts is not None:
            tile_counts[0] += selection.counts.sum()
        return out
