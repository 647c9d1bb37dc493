"""The one-launch page-bound decode kernel as a torch custom op, `attnpatch::bound_decode`, so a compiled
decode step calls it without a graph break and a CUDA graph captures it (as `decode_op` does for the split
kernel). Eager calls go to `bound_decode_attention` directly."""

# No `from __future__ import annotations`: `custom_op` reads the schema from real annotations.
from typing import Optional

import torch

from attnpatch.backends.triton.bound_decode import bound_decode_attention
from attnpatch.sparsity import BoundPages

__all__ = ["bound_decode", "bound_decode_op"]


@torch.library.custom_op("attnpatch::bound_decode", mutates_args=())
def bound_decode_op(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    page_min: torch.Tensor,
    page_max: torch.Tensor,
    first: torch.Tensor,
    end: torch.Tensor,
    n_pages: int,
    k: int,
    keep_last: int,
    combine: str,
    page_size: int,
    scale: float,
    key_start: Optional[torch.Tensor],  # noqa: UP045  (custom_op schema inference)
    key_valid: Optional[torch.Tensor],  # noqa: UP045
    counters: Optional[torch.Tensor],  # noqa: UP045
) -> torch.Tensor:
    """`bound_decode_attention`; out `[B, Hq, 1, Dv]`. `counters` (int32 zeros) are declared unmutated: the
    kernel counts on them and returns them to zero, so the op leaves its inputs as it found them (opcheck
    compares them before and after)."""
    return bound_decode_attention(query, key, value, page_min, page_max, n_pages, k, first, end, page_size=page_size,
                                  scale=scale, keep_last=keep_last, combine=combine, key_start=key_start,
                                  key_valid=key_valid, counters=counters)


@bound_decode_op.register_fake
def _bound_decode_fake(query, key, value, page_min, page_max, first, end, n_pages, k, keep_last, combine, page_size,
                       scale, key_start, key_valid, counters):
    return query.new_empty(query.shape[0], query.shape[1], 1, value.shape[-1])


def bound_decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, pages: BoundPages, *,
                 key_start: torch.Tensor | None = None, key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """The op with a `BoundPages` description."""
    end = torch.as_tensor(pages.end, device=query.device)
    return bound_decode_op(query, key, value, pages.page_min, pages.page_max, pages.first, end, pages.n_pages,
                           pages.k, pages.keep_last, pages.combine, pages.page_size, float(pages.scale), key_start,
                           key_valid, pages.counters)
