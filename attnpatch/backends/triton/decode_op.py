"""The Triton split-KV decode kernel as a torch custom op, `attnpatch::sparse_decode`.

`torch.compile` cannot trace a Triton launch made through the kernel's Python wrapper (host-side
planning, workspace allocation); as a custom op with a fake (shape-only) implementation the whole
decode step stays one graph, and `mode="reduce-overhead"` captures the op's launches in a CUDA graph
(the wrapper makes no host sync). The Triton backend calls it when `torch.compiler.is_compiling()`;
eager calls go to `sparse_decode_attention` directly (no dispatcher overhead) and are the same code.
Under `TRITON_INTERPRET=1` (set before import) the op runs the interpreted kernel on CPU tensors.

No tile counters here: a compiled step keeps no per-call statistics (see `attnpatch.dispatch`).
"""

# No `from __future__ import annotations`: `custom_op` reads the schema from real annotations.
from typing import Optional

import torch

from attnpatch.backends.triton.decode import sparse_decode_attention
from attnpatch.sparsity import PageSelection, num_blocks

__all__ = ["sparse_decode", "sparse_decode_op", "sparse_decode_page_lse_op", "sparse_decode_with_page_lse"]


@torch.library.custom_op("attnpatch::sparse_decode", mutates_args=())
def sparse_decode_op(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    indices: torch.Tensor,
    counts: torch.Tensor,
    page_size: int,
    scale: float,
    skip_bound: Optional[float],  # noqa: UP045  (custom_op schema inference)
    skip_bound_heads: Optional[torch.Tensor],  # noqa: UP045
    key_start: Optional[torch.Tensor],  # noqa: UP045
    key_valid: Optional[torch.Tensor],  # noqa: UP045
) -> torch.Tensor:
    """`sparse_decode_attention` over `PageSelection(indices, counts, page_size, L)`; out `[B, Hq, 1, Dv]`."""
    selection = PageSelection(indices, counts, page_size, key.shape[2])
    bound = skip_bound_heads if skip_bound_heads is not None else skip_bound
    return sparse_decode_attention(query, key, value, selection, scale=scale, skip_bound=bound,
                                   key_start=key_start, key_valid=key_valid)


@sparse_decode_op.register_fake
def _sparse_decode_fake(query, key, value, indices, counts, page_size, scale, skip_bound, skip_bound_heads,
                        key_start, key_valid):
    b, hq = query.shape[0], query.shape[1]
    return query.new_empty(b, hq, 1, value.shape[-1])


@torch.library.custom_op("attnpatch::sparse_decode_page_lse", mutates_args=())
def sparse_decode_page_lse_op(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    indices: torch.Tensor,
    counts: torch.Tensor,
    page_size: int,
    scale: float,
    key_start: Optional[torch.Tensor],  # noqa: UP045  (custom_op schema inference)
    key_valid: Optional[torch.Tensor],  # noqa: UP045
) -> tuple[torch.Tensor, torch.Tensor]:
    """`sparse_decode_with_page_lse` as one op (compiled steps)."""
    return sparse_decode_with_page_lse(query, key, value, PageSelection(indices, counts, page_size, key.shape[2]),
                                       scale=scale, key_start=key_start, key_valid=key_valid)


def sparse_decode_with_page_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, selection: PageSelection,
                                *, scale: float, key_start: torch.Tensor | None = None,
                                key_valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`sparse_decode_attention(..., page_lse=...)` without skipping: `(out [B, Hq, 1, Dv], page_lse [B, Hq,
    ceil(L / page_size)])`, the listed pages' log-sum-exp in a buffer of -inf (the others stay -inf)."""
    page_lse = torch.full((query.shape[0], query.shape[1], num_blocks(key.shape[2], selection.page_size)),
                          float("-inf"), dtype=torch.float32, device=query.device)
    out = sparse_decode_attention(query, key, value, selection, scale=scale, key_start=key_start,
                                  key_valid=key_valid, page_lse=page_lse)
    return out, page_lse


@sparse_decode_page_lse_op.register_fake
def _sparse_decode_page_lse_fake(query, key, value, indices, counts, page_size, scale, key_start, key_valid):
    b, hq = query.shape[0], query.shape[1]
    return (query.new_empty(b, hq, 1, value.shape[-1]),
            query.new_empty(b, hq, num_blocks(key.shape[2], page_size), dtype=torch.float32))


def sparse_decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, selection: PageSelection, *,
                  scale: float, skip_bound: float | torch.Tensor | None = None,
                  key_start: torch.Tensor | None = None, key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """The op with `sparse_decode_attention`'s arguments (a selection, a float or tensor skip bound)."""
    heads = skip_bound if isinstance(skip_bound, torch.Tensor) else None
    scalar = None if skip_bound is None or heads is not None else float(skip_bound)
    return sparse_decode_op(query, key, value, selection.indices, selection.counts, selection.page_size,
                            float(scale), scalar, heads, key_start, key_valid)
