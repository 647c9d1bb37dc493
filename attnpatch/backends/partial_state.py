"""Un-normalised attention state ``(m, l, acc)`` shared by the Triton kernels' host code.

``m`` is the running row max on natural-log scaled scores, ``l`` the softmax denominator relative
to it, ``acc`` the un-normalised output; a pass can return it and another pass resume from it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

State = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def check_state(init_state: Sequence[torch.Tensor], b: int, hq: int, lq: int, dv: int) -> State:
    """`init_state` as ``(m, l, acc)``, or ValueError naming the expected shapes."""
    if len(init_state) != 3:
        raise ValueError("init_state must be a tuple (m, l, acc)")
    m, denom, acc = init_state
    if tuple(m.shape) != (b, hq, lq) or tuple(denom.shape) != (b, hq, lq) or tuple(acc.shape) != (b, hq, lq, dv):
        raise ValueError(
            f"init_state shapes {tuple(m.shape)}, {tuple(denom.shape)}, {tuple(acc.shape)}; "
            f"expected {(b, hq, lq)}, {(b, hq, lq)}, {(b, hq, lq, dv)}"
        )
    return m, denom, acc


def finalize_state(state: Sequence[torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`(out, lse)` from an un-normalised state `(m, l, acc)`: ``acc / l`` and ``m + log l``.

    Rows with ``l = 0`` (no key seen) give output 0 and ``lse = -inf``.
    """
    m, denom, acc = state
    seen = denom > 0
    safe = torch.where(seen, denom, torch.ones_like(denom))
    out = (acc / safe.unsqueeze(-1)).to(dtype)
    lse = torch.where(seen, m + torch.log(safe), torch.full_like(m, float("-inf")))
    return out, lse


def state_from_output(out: torch.Tensor, lse: torch.Tensor) -> State:
    """A resumable state `(m, l, acc)` equivalent to a normalised partial result `(out, lse)`.

    ``m = lse``, ``l = 1``, ``acc = out`` (float32); rows with ``lse = -inf`` become
    ``(-inf, 0, 0)``. Lets a pass that only returns ``(out, lse)`` (e.g. the PyTorch reference)
    be continued by a kernel that resumes from a state over a disjoint key set.
    """
    lse = lse.float()
    seen = torch.isfinite(lse)
    m = torch.where(seen, lse, torch.full_like(lse, float("-inf")))
    denom = seen.float()
    acc = torch.where(seen.unsqueeze(-1), out.float(), torch.zeros((), dtype=torch.float32, device=out.device))
    return m.contiguous(), denom.contiguous(), acc.contiguous()


def pack_results(primary, lse: torch.Tensor | None, tiles: tuple[torch.Tensor, torch.Tensor] | None):
    """``primary``, or ``(primary, lse?, tiles?)`` with only the extras that were asked for."""
    extras: list = []
    if lse is not None:
        extras.append(lse)
    if tiles is not None:
        extras.append(tiles)
    return (primary, *extras) if extras else primary
