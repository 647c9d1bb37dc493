"""The Triton backend as a `Backend`: block-sparse and token-gather prefill, split-KV sparse decode."""

from __future__ import annotations

import torch

from attnpatch.backends.base import Backend, needs_grad, page_lse_skip_reason
from attnpatch.backends.triton.utils import interpreter_enabled, triton_available
from attnpatch.sparsity import TokenSelection


def _bounds_reason(bounds, key_valid_ok: bool = False) -> str | None:
    if bounds.mask is not None:
        return "the attention mask is not causal + padding (the kernels take left padding only)"
    if bounds.window is not None:
        return "sliding window (the kernels have no window)"
    if bounds.key_valid is not None and not key_valid_ok:
        return "padding that is not left padding (the kernels take a first real key per row)"
    return None


def _decode_call_reason(query, key, value, bounds) -> str | None:
    """What every decode launch declines: gradients, masks the kernels do not take, a bad validity tensor."""
    if needs_grad(query, key, value):
        return "inputs require grad (forward-only kernels)"
    reason = _bounds_reason(bounds, key_valid_ok=True)
    if reason is not None:
        return reason
    valid = bounds.key_valid
    if valid is not None and (valid.dtype != torch.bool or tuple(valid.shape) != (key.shape[0], key.shape[2])):
        return f"per-key validity {valid.dtype} {tuple(valid.shape)} is not bool [B, Lk] of the keys"
    return None


def _add_tiles(tile_counts: torch.Tensor | None, result):
    if tile_counts is None:
        return result
    out, (visited, skipped) = result
    tile_counts += torch.stack([visited, skipped]).to(tile_counts)
    return out


class TritonBackend(Backend):
    name = "triton"
    description = "attnpatch's Triton kernels: block-sparse (TMA on Hopper), token gather, split-KV decode"

    def unavailable(self, device: torch.device) -> str | None:
        if not triton_available():
            return "triton is not installed"
        if device.type != "cuda" and not interpreter_enabled():
            return f"needs a CUDA device (got {device.type})"
        return None

    def prefill_reason(self, query, key, value, selection, bounds):
        if needs_grad(query, key, value):
            return "inputs require grad (forward-only kernels)"
        reason = _bounds_reason(bounds)
        if reason is not None:
            return reason
        if isinstance(selection, TokenSelection):
            from attnpatch.backends.triton.gather import unsupported_reason

            if bounds.key_start is not None:
                return "left padding (the gather kernel takes no first key)"
            return unsupported_reason(query, key, value, selection)
        from attnpatch.backends.triton.block_sparse import unsupported_reason

        return unsupported_reason(query, key, value, selection)

    def prefill(self, query, key, value, selection, *, scale, bounds, tile_counts=None):
        if isinstance(selection, TokenSelection):
            from attnpatch.backends.triton.gather import token_gather_attention_triton

            if tile_counts is not None:
                tile_counts[0] += selection.counts.sum()
            return token_gather_attention_triton(query, key, value, selection, scale=scale)
        from attnpatch.backends.triton.block_sparse import block_sparse_attention_triton

        skip = None if selection.skip is None else selection.skip.log_threshold
        return _add_tiles(tile_counts, block_sparse_attention_triton(
            query, key, value, selection, scale=scale, skip_bound=skip, key_start=bounds.key_start,
            count_tiles=tile_counts is not None))

    def decode_reason(self, query, key, value, selection, bounds):
        reason = _decode_call_reason(query, key, value, bounds)
        if reason is not None:
            return reason
        from attnpatch.backends.triton.decode import unsupported_reason

        return unsupported_reason(query, key, value, selection)

    def decode(self, query, key, value, selection, *, scale, bounds, tile_counts=None):
        skip = None if selection.skip is None else selection.skip.log_threshold
        if torch.compiler.is_compiling():  # one opaque op: no graph break, capturable in a CUDA graph
            from attnpatch.backends.triton.decode_op import sparse_decode

            return sparse_decode(query, key, value, selection, scale=scale, skip_bound=skip,
                                 key_start=bounds.key_start, key_valid=bounds.key_valid)
        from attnpatch.backends.triton.decode import sparse_decode_attention

        return _add_tiles(tile_counts, sparse_decode_attention(
            query, key, value, selection, scale=scale, skip_bound=skip, key_start=bounds.key_start,
            key_valid=bounds.key_valid, count_tiles=tile_counts is not None))

    def decode_bound_reason(self, query, key, value, pages, bounds):
        from attnpatch.backends.triton import bound_decode as bd

        switch = bd.mode()
        if switch == "off":
            return ("the one-launch kernel is off (ATTNPATCH_BOUND_DECODE_CONFIG=off; unset or auto takes it up to 8 "
                    "batch × KV head rows, on always)")
        rows = query.shape[0] * key.shape[1]
        if pages.counters is None or pages.counters.numel() < 2 * rows:
            return ("no barrier counters from the cache layer for these rows (a buffer first made in a compiled step "
                    f"would live in its CUDA-graph pool, which inductor refuses; need {2 * rows} int32 zeros)")
        reason = _decode_call_reason(query, key, value, bounds)
        if reason is not None:
            return reason
        return (bd.unsupported_reason(query, key, value, pages.page_min, pages.k, pages.page_size, pages.n_pages)
                or (bd.too_many_rows_reason(query, key) if switch == "auto" else None)
                or bd.few_programs_reason(query, key, pages.k, pages.page_size))

    def decode_bound(self, query, key, value, pages, *, scale, bounds):
        if torch.compiler.is_compiling():
            from attnpatch.backends.triton.bound_decode_op import bound_decode

            return bound_decode(query, key, value, pages, key_start=bounds.key_start, key_valid=bounds.key_valid)
        from attnpatch.backends.triton.bound_decode import bound_decode_attention

        return bound_decode_attention(query, key, value, pages.page_min, pages.page_max, pages.n_pages, pages.k,
                                      pages.first, pages.end, page_size=pages.page_size, scale=pages.scale,
                                      keep_last=pages.keep_last, combine=pages.combine, key_start=bounds.key_start,
                                      key_valid=bounds.key_valid, counters=pages.counters)

    def decode_page_lse_reason(self, query, key, value, selection, bounds):
        return page_lse_skip_reason(selection)

    def decode_page_lse(self, query, key, value, selection, *, scale, bounds):
        from attnpatch.backends.triton.decode_op import sparse_decode_page_lse_op, sparse_decode_with_page_lse

        if torch.compiler.is_compiling():
            return sparse_decode_page_lse_op(query, key, value, selection.indices, selection.counts,
                                             selection.page_size, float(scale), bounds.key_start, bounds.key_valid)
        return sparse_decode_with_page_lse(query, key, value, selection, scale=scale, key_start=bounds.key_start,
                                           key_valid=bounds.key_valid)
