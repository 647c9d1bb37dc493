"""The backend protocol: what every executor of selections says and does.

A backend runs prefill selections (block or token granularity), dense prefill, and/or decode page
selections. Before each call the dispatcher asks it why it cannot take the input (`*_reason`: a
string naming what is not supported, or None); a backend that declines is skipped for the next one
in the order, and the reason is kept in the patch's stats. Backends hold no policy: what to compute
is in the selection and the key bounds.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from attnpatch.sparsity import BlockSelection, BoundPages, KeyBounds, PageSelection, TokenSelection

PrefillSelection = BlockSelection | TokenSelection


def needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def page_lse_skip_reason(selection: PageSelection) -> str | None:
    """Per-page log-sum-exp needs every listed tile's scores: none in skip mode."""
    return "skip mode (BLASST) leaves skipped tiles without scores" if selection.skip is not None else None


class Backend:
    """Base class: every capability declined until a backend implements it."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    def unavailable(self, device: torch.device) -> str | None:
        """Why this backend cannot run on `device` at all (not installed, wrong device), or None."""
        return None

    # -- prefill over a selection ------------------------------------------------------------
    def prefill_reason(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       selection: PrefillSelection, bounds: KeyBounds) -> str | None:
        return "no sparse prefill path"

    def prefill(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, selection: PrefillSelection,
                *, scale: float, bounds: KeyBounds, tile_counts: torch.Tensor | None = None) -> torch.Tensor:
        """`[B, Hq, Lq, Dv]` attention of the selection; adds (visited, skipped) tiles to `tile_counts`."""
        raise NotImplementedError

    # -- dense causal prefill ------------------------------------------------------------------
    def dense_reason(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     bounds: KeyBounds) -> str | None:
        return "no dense prefill path"

    def dense(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, scale: float,
              bounds: KeyBounds) -> torch.Tensor:
        raise NotImplementedError

    # -- decode over a page selection ------------------------------------------------------------
    def decode_reason(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      selection: PageSelection, bounds: KeyBounds) -> str | None:
        return "no decode path"

    def decode(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, selection: PageSelection,
               *, scale: float, bounds: KeyBounds, tile_counts: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def decode_page_lse_reason(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               selection: PageSelection, bounds: KeyBounds) -> str | None:
        """Why `decode_page_lse` cannot take the call (None when it can; `decode_reason` is asked first)."""
        return "does not write per-page log-sum-exp"

    def decode_page_lse(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, selection: PageSelection,
                        *, scale: float, bounds: KeyBounds) -> tuple[torch.Tensor, torch.Tensor]:
        """`decode` without skipping, and `[B, Hq, ceil(L / page_size)]` float32: each listed page's
        natural-log log-sum-exp of its visible keys' scaled scores per query head, -inf on pages not listed."""
        raise NotImplementedError

    def decode_bound_reason(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, pages: BoundPages,
                            bounds: KeyBounds) -> str | None:
        """Why `decode_bound` cannot take the call (None when it can)."""
        return "does not select pages in the launch that attends"

    def decode_bound(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, pages: BoundPages,
                     *, scale: float, bounds: KeyBounds) -> torch.Tensor:
        """`[B, Hq, 1, Dv]`: `decode` over the selection `pages` describes, made in the same launch."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<backend {self.name}>"
