"""Page-list helpers the page-selecting decode methods share (Quest, Recycled Attention): budget
checks, the keys a decode query may see, and turning per-page scores into a fixed-size
`PageSelection` with tensor ops only (no host sync, no loop over heads or pages)."""

from __future__ import annotations

import torch

from attnpatch.options import option
from attnpatch.sparsity import PageSelection


def check_budget(method: str, budget: int, page_size: int, local_pages: int = 0) -> None:
    """ValueError unless `budget` is a multiple of `page_size` holding the forced pages (sink,
    current, `local_pages` before it) and at least one chosen page."""
    pages = 3 + local_pages
    low = pages * page_size
    if budget % page_size or budget < low:
        local = f", {local_pages} local page(s)" if local_pages else ""
        raise ValueError(f"option 'budget' of decode method {method!r} must be a multiple of page_size "
                         f"({page_size}) of at least {low} tokens ({pages} pages: the sink page, the current "
                         f"page{local} and one chosen page), e.g. {low}, {low + page_size}, ...; got {budget}")


def pages_for_budget(budget: int, page_size: int = 64, min_pages: int = 8) -> int:
    """`page_size`, or half of it where the budget holds fewer than `min_pages` such pages and is a multiple
    of the half (a budget that fits neither keeps `page_size`, so `check_budget` names what is allowed)."""
    half = page_size // 2
    return half if budget // page_size < min_pages and budget % half == 0 else page_size


TOPK_KERNELS = ("torch", "triton")


def topk_option(default: str = "torch"):
    """The `topk` option of the page-selecting methods (how `top_pages` finds the pages)."""
    return option(default, "how the top pages are found: torch.topk + a sort, or one Triton launch that selects "
                  "and orders them (torch.topk where the kernel declines the input, e.g. on CPU)",
                  choices=TOPK_KERNELS)


def top_pages(score: torch.Tensor, k: int, valid: torch.Tensor, forced: torch.Tensor, kv_len: int,
              page_size: int, kernel: str = "torch") -> PageSelection:
    """The `k` best pages per (row, KV head) by `score` `[B, Hkv, n]` among `valid` ones, `forced`
    ones always in (both broadcast to the score); fewer when fewer are valid. `kernel`: "torch"
    (`torch.topk`, then one sort) or "triton" (one launch that selects and orders,
    `attnpatch.backends.triton.topk_select`; the torch path where it declines the input)."""
    n = score.shape[-1]
    big = torch.finfo(score.dtype).max
    score = torch.where(forced & valid, big, torch.where(valid, score, float("-inf")))
    if kernel == "triton":
        from attnpatch.backends.triton import topk_select

        if topk_select.unsupported_reason(score, k) is None:
            if torch.compiler.is_compiling():
                from attnpatch.backends.triton.topk_select_op import topk_ascending_op

                indices, counts = topk_ascending_op(score, k)
            else:
                indices, counts = topk_select.topk_ascending_triton(score, k)
            return PageSelection(indices, counts, page_size, kv_len)
    elif kernel != "torch":
        raise ValueError(f"top_pages: kernel must be one of {TOPK_KERNELS}, got {kernel!r}")
    vals, idx = score.topk(k, dim=-1, sorted=False)  # unsorted: the one sort below orders the pages
    # top-k indices are distinct: one sort puts the wanted pages first, ascending (no dedup pass)
    order = torch.where(vals > float("-inf"), idx, n).sort(-1).values
    counts = (order < n).sum(-1, dtype=torch.int32)
    return PageSelection(torch.where(order < n, order, 0).to(torch.int32), counts, page_size, kv_len)


def group_top_pages(bound: torch.Tensor, k: int, first: torch.Tensor, end: torch.Tensor, keep_last: int,
                    combine: str, kv_len: int, page_size: int,
                    flag: torch.Tensor | None = None) -> PageSelection | None:
    """One Triton launch (`attnpatch.backends.triton.topk_select.group_topk_ascending_triton`) that
    combines the G bound rows of each KV head (`combine`: "softmax_sum" or "max"), masks the pages
    outside `first[b] <= page < end`, forces `first[b]` and the `keep_last + 1` last pages, and selects
    the `k` best in ascending order; None where the kernel declines the input (the caller keeps the
    torch path). `bound` `[B, Hkv, G, n]` float32, `first` `[B]`, `end` 0-dim or `[B]`; `flag` (1-element
    int tensor): the kernel selects only when it reads nonzero, else the lists are left unwritten."""
    from attnpatch.backends.triton import topk_select

    if topk_select.group_unsupported_reason(bound, k) is not None:
        return None
    if torch.compiler.is_compiling():
        from attnpatch.backends.triton.topk_select_op import group_topk_ascending_op

        indices, counts = group_topk_ascending_op(bound, k, first, end, combine, keep_last, flag)
    else:
        indices, counts = topk_select.group_topk_ascending_triton(bound, k, first, end, combine, keep_last, flag)
    return PageSelection(indices, counts, page_size, kv_len)
