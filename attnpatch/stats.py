"""Per-layer counters of what a patch computed: density, kept blocks, dense fallbacks and why."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from attnpatch.sparsity import BlockSelection, PageSelection, TokenSelection, causal_block_limit

PENDING_CALLS = 64  # page-selecting decode calls a layer holds before summing their reads in one batch
PENDING_ENTRIES = 1 << 18  # ... or list entries (2 MB as int64 per layer: long lists, e.g. every page, sum sooner)


@dataclass
class LayerStats:
    """Counters for one layer. Block counts include dense calls (as fully kept blocks)."""

    layer: int
    prefill_method: str
    decode_method: str
    sliding_window: int | None = None
    prefill_calls: int = 0
    decode_calls: int = 0
    dense_fallbacks: Counter = field(default_factory=Counter)
    backends: Counter = field(default_factory=Counter)  # "phase: backend" that ran each call
    backend_declined: Counter = field(default_factory=Counter)  # "phase: backend: why it declined"
    notes: list[str] = field(default_factory=list)
    max_decode_keys: int = 0
    prefill_tiles: torch.Tensor = field(default_factory=lambda: torch.zeros(2, dtype=torch.int64))  # visited, skipped
    # skip-rule calls only
    decode_tiles: torch.Tensor = field(default_factory=lambda: torch.zeros(2, dtype=torch.int64))
    # Decode reads, summed over rows × KV heads × steps: (keys read, keys in the context) over every
    # decode call (dense ones read all), and (pages read, pages in the cache) over page-selecting calls.
    decode_keys: torch.Tensor = field(default_factory=lambda: torch.zeros(2, dtype=torch.int64))
    decode_pages: torch.Tensor = field(default_factory=lambda: torch.zeros(2, dtype=torch.int64))
    decode_budget: int | None = None  # the decode method's `budget` option (keys per KV head), if it has one
    _dense_keys: list = field(default_factory=lambda: [0, 0])  # host-counted part of `decode_keys`
    _pending: list = field(default_factory=list)  # page-selecting decode calls not yet summed (`add_decode`)
    _pending_entries: int = 0  # list entries they hold
    select_events: list = field(default_factory=list)  # (start, end) CUDA events around `select`, resolved lazily
    select_seconds: float = 0.0  # host-timed `select` calls (CPU)
    _kept: torch.Tensor | None = None  # [H] kept block pairs (summed over batch and calls)
    _total: torch.Tensor | None = None  # [H] causally valid block pairs

    def add_selection(self, sel: BlockSelection | TokenSelection) -> None:
        self._accumulate(*sel.kept_and_total())

    def add_dense(self, batch: int, heads: int, q_len: int, kv_len: int, block: int, reason: str | None) -> None:
        total = float(causal_block_limit(q_len, kv_len, block, block).sum()) * batch
        t = torch.full((heads,), total, dtype=torch.float64)
        self._accumulate(t, t)
        if reason is not None:
            self.dense_fallbacks[reason] += 1

    def _accumulate(self, kept: torch.Tensor, total: torch.Tensor) -> None:
        if self._kept is None or self._kept.shape != kept.shape:
            self._kept, self._total = kept.clone(), total.clone().to(kept.device)
        else:
            self._kept += kept.to(self._kept.device)
            self._total += total.to(self._total.device)

    def add_decode(self, selection: PageSelection | None, key: torch.Tensor, cache_layer: Any = None,
                   budget: int | None = None) -> None:
        """Count one decode call's reads: all keys (`selection` None: dense) or the selected pages' keys.

        The context length is the cache layer's (`get_seq_length()`: the written length of a static
        cache, every token seen by an evicting one), else the key length. Device-side, no sync. A page
        selection is copied (its lists may be reused and changed in place later) and summed with up to
        `PENDING_CALLS` others (or `PENDING_ENTRIES` list entries) in one batch: a handful of tensor ops per
        layer and step cost an eager decode step more than its attention (`hf_decode --host-profile`: 7.9 of
        54 ms a step at 32K, batch 1, 32 layers, H100, before this)."""
        if selection is not None and not isinstance(selection, PageSelection):
            return  # the method computed the step itself (a DecodeOutput): its reads are its own to report
        b, hkv, lk = key.shape[0], key.shape[1], key.shape[2]
        seen = cache_layer.get_seq_length() if hasattr(cache_layer, "get_seq_length") else lk
        if not isinstance(seen, torch.Tensor):
            seen = seen or lk
            if selection is None:  # host-side counts: no device work on the dense path
                self._dense_keys[0] += min(seen, lk) * b * hkv
                self._dense_keys[1] += seen * b * hkv
                return
        device = key.device
        if selection is None:
            context = torch.as_tensor(seen, device=device)
            keys = self._counter("decode_keys", device)
            keys += torch.stack([context.clamp(max=lk), context]).to(keys) * (b * hkv)
            return
        self.decode_budget = budget
        parts = [selection.indices.reshape(-1), selection.counts.reshape(-1)]
        host_context = None
        if isinstance(seen, torch.Tensor):
            parts.append(seen.reshape(1).to(device))
        else:
            host_context = int(seen)
        packed = torch.cat(parts)  # one op: a copy (whatever the lists do next), dtypes promoted
        self._pending.append((packed, tuple(selection.indices.shape), selection.page_size, host_context))
        self._pending_entries += packed.numel()
        if len(self._pending) >= PENDING_CALLS or self._pending_entries >= PENDING_ENTRIES:
            self._sum_pending()

    def _sum_pending(self) -> None:
        """Add the held page-selecting calls' reads to `decode_keys` / `decode_pages` (one batch per list shape)."""
        groups: dict[tuple, list] = {}
        for packed, shape, page_size, host_context in self._pending:
            key = (shape, page_size, host_context is None, packed.device)  # (int32 and int64 rows stack as int64)
            groups.setdefault(key, []).append((packed, host_context))
        self._pending, self._pending_entries = [], 0
        for (shape, ps, device_context, device), items in groups.items():
            b, hkv, width = shape
            n, lists = len(items), b * hkv * width
            data = torch.stack([packed.long() for packed, _ in items])
            indices = data[:, :lists].view(n, b, hkv, width)
            counts = data[:, lists:lists + b * hkv].view(n, b, hkv, 1)
            if device_context:
                context = data[:, -1]
            else:
                context = torch.tensor([c for _, c in items], dtype=torch.int64, device=device)
            listed = torch.arange(width, device=device) < counts
            in_page = (context.view(n, 1, 1, 1) - indices * ps).clamp(0, ps)
            read = torch.where(listed, in_page, 0).sum()
            keys = self._counter("decode_keys", device)
            keys += torch.stack([read, context.sum() * (b * hkv)]).to(keys)
            pages = self._counter("decode_pages", device)
            pages += torch.stack([listed.sum(), ((context + ps - 1) // ps).sum() * (b * hkv)]).to(pages)

    def _counter(self, name: str, device: torch.device) -> torch.Tensor:
        counter = getattr(self, name)
        if counter.device != device:
            counter = counter.to(device)
            setattr(self, name, counter)
        return counter

    def tile_counter(self, phase: str, device: torch.device) -> torch.Tensor:
        """The (visited, skipped) counter an executor adds into, moved to the executor's device."""
        return self._counter(f"{phase}_tiles", device)

    def select_ms(self) -> float:
        """Time spent deciding what to compute (the method's `select`: estimate + selection), in ms;
        CUDA calls are timed with events, resolved here (one sync)."""
        ms = self.select_seconds * 1e3
        if self.select_events:
            torch.cuda.synchronize()
            ms += sum(start.elapsed_time(end) for start, end in self.select_events)
        return ms

    def as_dict(self) -> dict[str, Any]:
        self._sum_pending()
        per_head = None if self._kept is None else (self._kept / self._total).tolist()
        pv, ps = (int(x) for x in self.prefill_tiles.tolist())
        dv, ds = (int(x) for x in self.decode_tiles.tolist())
        keys_read, keys_total = (int(x) + h for x, h in zip(self.decode_keys.tolist(), self._dense_keys, strict=True))
        pages_read, pages_total = (int(x) for x in self.decode_pages.tolist())
        return {
            "layer": self.layer,
            "prefill_method": self.prefill_method,
            "decode_method": self.decode_method,
            "sliding_window": self.sliding_window,
            "prefill_calls": self.prefill_calls,
            "select_ms": self.select_ms(),
            "decode_calls": self.decode_calls,
            "density": None if per_head is None else float(self._kept.sum() / self._total.sum()),
            "density_per_head": per_head,
            "kept_blocks": None if self._kept is None else int(self._kept.sum()),
            "total_blocks": None if self._total is None else int(self._total.sum()),
            "dense_fallbacks": dict(self.dense_fallbacks),
            "backends": dict(self.backends),
            "backend_declined": dict(self.backend_declined),
            "max_decode_keys": self.max_decode_keys,
            "skipped_tiles": ps,
            "visited_tiles": pv,
            "skipped_fraction": ps / pv if pv else None,
            "decode_skipped_fraction": ds / dv if dv else None,
            "decode_density": keys_read / keys_total if keys_total else None,
            "decode_keys_read": keys_read,
            "decode_keys_total": keys_total,
            "decode_pages_read": pages_read,
            "decode_pages_total": pages_total,
            "decode_budget": self.decode_budget,
            "notes": list(self.notes),
        }


@dataclass
class PatchStats:
    """What `Patch.stats()` returns: one entry per layer plus model-wide totals."""

    layers: list[dict[str, Any]]

    @property
    def density(self) -> float | None:
        """Prefill density over all layers: computed / causally valid block pairs (dense calls count as 1)."""
        kept = sum(d["kept_blocks"] or 0 for d in self.layers)
        total = sum(d["total_blocks"] or 0 for d in self.layers)
        return kept / total if total else None

    @property
    def decode_density(self) -> float | None:
        """Decode keys read / keys in the context over all layers, rows, KV heads and steps (dense
        decode calls read every key)."""
        total = sum(d["decode_keys_total"] for d in self.layers)
        return sum(d["decode_keys_read"] for d in self.layers) / total if total else None

    @property
    def skipped_fraction(self) -> float | None:
        """Share of visited prefill tiles that a skip rule (BLASST) dropped, over all layers."""
        visited = sum(d["visited_tiles"] for d in self.layers)
        return sum(d["skipped_tiles"] for d in self.layers) / visited if visited else None

    @property
    def dense_fallbacks(self) -> dict[str, int]:
        out: Counter = Counter()
        for d in self.layers:
            out.update(d["dense_fallbacks"])
        return dict(out)

    @property
    def select_ms(self) -> float:
        """Time spent in the methods' `select` (estimation and selection) over all layers, in ms."""
        return sum(d["select_ms"] for d in self.layers)

    @property
    def backends(self) -> dict[str, int]:
        """Calls per "phase: backend" over all layers ("sdpa" is transformers' own dense path)."""
        out: Counter = Counter()
        for d in self.layers:
            out.update(d["backends"])
        return dict(out)

    @property
    def backend_declined(self) -> dict[str, int]:
        """Why a faster backend declined, with the number of calls, over all layers."""
        out: Counter = Counter()
        for d in self.layers:
            out.update(d["backend_declined"])
        return dict(out)

    def to_dict(self) -> dict[str, Any]:
        return {"density": self.density, "skipped_fraction": self.skipped_fraction, "select_ms": self.select_ms,
                "decode_density": self.decode_density,
                "dense_fallbacks": self.dense_fallbacks, "backends": self.backends,
                "backend_declined": self.backend_declined, "layers": self.layers}
