"""`LayerStats.add_decode`: page-selecting calls are held and summed in batches; the sums equal a per-call count."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from attnpatch.sparsity import PageSelection
from attnpatch.stats import PENDING_CALLS, PENDING_ENTRIES, LayerStats


class _Layer:
    def __init__(self, seen):
        self.seen = seen

    def get_seq_length(self):
        return self.seen


def _expected(calls):
    """(keys read, keys in context, pages read, pages in cache) counted call by call."""
    read = total = pages = all_pages = 0
    for sel, context in calls:
        b, hkv, _ = sel.indices.shape
        for row in range(b):
            for head in range(hkv):
                listed = sel.indices[row, head, : int(sel.counts[row, head])].tolist()
                read += sum(min(max(context - p * sel.page_size, 0), sel.page_size) for p in listed)
                pages += len(listed)
        total += context * b * hkv
        all_pages += -(-context // sel.page_size) * b * hkv
    return read, total, pages, all_pages


def _selection(gen, b, hkv, width, n_pages, page_size):
    indices = torch.stack([torch.randperm(n_pages, generator=gen)[:width].sort().values for _ in range(b * hkv)])
    counts = torch.randint(1, width + 1, (b, hkv), generator=gen, dtype=torch.int32)
    return PageSelection(indices.view(b, hkv, width).to(torch.int32), counts, page_size, n_pages * page_size)


def test_held_calls_sum_to_the_per_call_count_and_ignore_later_changes():
    gen = torch.Generator().manual_seed(0)
    stats = LayerStats(0, "dense", "quest")
    calls = []
    for step in range(PENDING_CALLS + 7):  # one batch summed on the way, the rest when read
        width, page_size = (4, 16) if step % 3 else (6, 32)  # two list shapes: two batches
        context = 100 + step
        sel = _selection(gen, 2, 3, width, max(width, -(-context // page_size) + 1), page_size)  # + pages past it
        seen = torch.tensor(context) if step % 2 else context  # a static cache's count is a tensor
        stats.add_decode(sel, torch.zeros(2, 3, context, 8), _Layer(seen))
        calls.append((PageSelection(sel.indices.clone(), sel.counts.clone(), page_size, sel.kv_len), context))
        sel.indices.zero_()  # a method reusing its lists in place must not change what was counted
        sel.counts.fill_(width)
        if isinstance(seen, torch.Tensor):
            seen += 1000
    d = stats.as_dict()
    read, total, pages, all_pages = _expected(calls)
    assert (d["decode_keys_read"], d["decode_keys_total"], d["decode_pages_read"]) == (read, total, pages)
    assert d["decode_density"] == read / total
    assert stats.decode_pages.tolist() == [pages, all_pages]


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in ("view", "_unsafe_view", "slice", "reshape", "expand"):
            self.ops += 1
        return func(*args, **(kwargs or {}))


def test_counting_a_page_selecting_call_costs_about_two_tensor_ops():
    """Eager decode steps are host-bound: the stats of a call must not add a dozen small kernels (they did: 7.9 of 54
    ms a step, 32K, batch 1, H100; bench/results/hf_decode_h100/host_profile_retrieval_long_read_2026-12-06/)."""
    sel = PageSelection(torch.zeros(1, 8, 16, dtype=torch.int32), torch.full((1, 8), 16, dtype=torch.int32), 64, 4096)
    key = torch.zeros(1, 8, 4096, 2)
    for seen in (4096, torch.tensor(4096)):
        stats, counter = LayerStats(0, "dense", "quest"), _OpCounter()
        with counter:
            for _ in range(4 * PENDING_CALLS):
                stats.add_decode(sel, key, _Layer(seen))
        assert counter.ops / (4 * PENDING_CALLS) < 2.5, counter.ops


def test_long_lists_are_summed_before_they_hold_much_memory():
    """Every page of a long cache per call: the held copies stay under `PENDING_ENTRIES` entries."""
    n = 4096
    sel = PageSelection(torch.arange(n, dtype=torch.int32).expand(2, 8, n), torch.full((2, 8), n, dtype=torch.int32),
                        16, 16 * n)
    stats = LayerStats(0, "dense", "blasst")
    for _ in range(40):
        stats.add_decode(sel, torch.zeros(2, 8, 16 * n, 1), _Layer(16 * n))
        assert sum(p.numel() for p, *_ in stats._pending) < PENDING_ENTRIES
    d = stats.as_dict()
    assert d["decode_keys_read"] == d["decode_keys_total"] == 40 * 16 * n * 2 * 8
