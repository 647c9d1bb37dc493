"""`RetrievalLayer`: RetrievalAttention's cache layer — a small GPU part (sinks + recent window +
generated tokens) and a CPU part (everything else) searched through a nearest-neighbour index."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicLayer

from attnpatch.cache.retrieval_index import (
    ExactIndex,
    IvfIndex,
    SearchResult,
    build_key_ivf,
    build_query_ivf,
    recall,
)

INDEX_KINDS = ("exact", "query_ivf", "key_ivf")
_AFTER_SPLIT = ("the retrieval cache offloaded its prompt at the first decode step; a later multi-token forward "
                "(chunked continuation, assisted decoding) would not see the offloaded keys: use a new cache for "
                "a new prompt, or decode='dense'")


@dataclass(frozen=True)
class IndexConfig:
    """How the CPU part is indexed (`attnpatch.cache.retrieval_index`)."""

    kind: str = "exact"
    cluster_size: int = 64
    n_probe: int = 16
    n_train: int = 1024
    links: int = 16
    kmeans_iters: int = 8


@dataclass
class Offloaded:
    """The CPU part of one layer: keys (float32, what the search scores), values (model dtype), the
    original position of every key, which keys are real (not padding), and the index."""

    keys: torch.Tensor  # [B, Hkv, N, D] float32
    values: torch.Tensor  # [B, Hkv, N, Dv]
    positions: torch.Tensor  # [B, N]
    valid: torch.Tensor  # [B, N]
    index: ExactIndex | IvfIndex

    def nbytes(self) -> int:
        tensors = (self.keys, self.values, self.positions, self.valid)
        return sum(t.numel() * t.element_size() for t in tensors) + self.index.nbytes()


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """`t` in CPU memory, pinned when it comes from a CUDA device (faster copies, async-capable)."""
    if t.device.type != "cuda":
        return t.contiguous()
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t)
    return out


class RetrievalLayer(DynamicLayer):
    """Full KV while the prompt is read; at the first decode step the prompt's KV is split: per row,
    the first `n_sink` real tokens and the last `window` ones stay on the device (the GPU part, which
    every generated token then joins), the rest moves to CPU memory with an index over its keys.

    `update` returns the GPU part (original RoPE positions in `returned_positions`, `[B, L]`, as
    `SinkWindowLayer`); `attend` computes a decode step: the GPU part exactly, the CPU part over the
    `top_k` keys the index retrieves per query head, merged by log-sum-exp. Rows of a left-padded
    batch keep the same number of tokens on the GPU (padding fills a short row); padding keys in
    the CPU part are marked invalid and never retrieved. Prefill queries (`observe_queries`) are
    kept, up to `n_train` per query head and call, for the attention-aware index.
    """

    is_sliding = False
    is_croppable = False

    def __init__(self, n_sink: int, window: int, top_k: int, index: IndexConfig, track_recall: bool = False):
        super().__init__()
        if index.kind not in INDEX_KINDS:
            raise ValueError(f"index kind must be one of {INDEX_KINDS}, got {index.kind!r}")
        self.n_sink, self.window, self.top_k, self.config = n_sink, window, top_k, index
        self.track_recall = track_recall
        self.cumulative_length = 0
        self.first_real: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None  # [B, stored] original positions of the GPU part
        self.returned_positions: torch.Tensor | None = None
        self.offloaded: Offloaded | None = None
        self._train: list[tuple[torch.Tensor, torch.Tensor]] = []  # (queries [B,Hq,n,D], positions [n])
        self.counters = {"steps": 0, "retrieved": 0.0, "scanned": 0.0, "recall_sum": 0.0, "recall_n": 0}

    # -- transformers' cache-layer interface ---------------------------------------------------
    def set_first_real(self, start: torch.Tensor | None) -> None:
        """Each row's first non-padding position `[B]` (None: no padding)."""
        self.first_real = start

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.positions = torch.zeros(key_states.shape[0], 0, dtype=torch.long, device=self.device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, new = key_states.shape[0], key_states.shape[-2]
        if self.offloaded is not None and new > 1:
            raise NotImplementedError(_AFTER_SPLIT)
        if self.offloaded is None and new == 1 and self.cumulative_length > self.n_sink + self.window:
            self._offload()
        new_pos = torch.arange(self.cumulative_length, self.cumulative_length + new, device=self.device)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.positions = torch.cat([self.positions, new_pos.expand(b, new)], dim=-1)
        self.cumulative_length += new
        # before the split the keys are every position 0..L-1: nothing for the dispatch to remap
        self.returned_positions = self.positions if self.offloaded is not None else None
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        """Empty for a new prompt: the GPU part dropped (transformers 5.17's `DynamicLayer.reset` zeroes the
        stored keys and keeps them, which a split cache would then prepend to the next prompt)."""
        super().reset()
        self.keys = self.values = None
        self.is_initialized = False
        self.cumulative_length = 0
        self.positions = self.returned_positions = self.offloaded = None
        self._train = []

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("the retrieval cache offloads tokens and cannot be cropped; use decode='dense' "
                                  "for assisted or speculative decoding")

    def static_variant(self, max_cache_len: int) -> StaticRetrievalLayer:
        return StaticRetrievalLayer(max_cache_len, self.n_sink, self.window, self.top_k, self.config,
                                    self.track_recall)

    # -- prefill queries -------------------------------------------------------------------------
    def observe_queries(self, query: torch.Tensor) -> None:
        """Keep up to `n_train` of a prefill call's queries per head (evenly spaced, the last included)."""
        if self.config.kind != "query_ivf" or self.offloaded is not None:
            return
        lq = query.shape[2]
        end = self.cumulative_length  # the cache already holds this call's keys
        take = torch.linspace(0, lq - 1, min(lq, self.config.n_train), device=query.device).round().long().unique()
        self._train.append((query.detach().index_select(2, take), end - lq + take))

    # -- the split -----------------------------------------------------------------------------
    def _starts(self, b: int) -> torch.Tensor:
        if self.first_real is None:
            return torch.zeros(b, 1, dtype=torch.long, device=self.device)
        return self.first_real.to(self.device, torch.long).view(b, 1)

    def _offload(self) -> None:
        """Split the stored prompt: GPU part (sinks + window, padding filling short rows) and CPU part."""
        b, hkv, n, d = self.keys.shape
        n_keep = self.n_sink + self.window
        pos = self.positions
        start = self._starts(b)
        real_kept = ((pos >= start) & (pos < start + self.n_sink)) | (pos >= self.cumulative_length - self.window)
        priority = torch.where(real_kept, 0, torch.where(pos < start, 1, 2))
        order = (priority * (n + 1) + torch.arange(n, device=self.device)).argsort(dim=-1)
        keep, away = order[:, :n_keep].sort(-1).values, order[:, n_keep:].sort(-1).values

        def take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            return t.gather(2, idx.view(b, 1, -1, 1).expand(b, t.shape[1], idx.shape[-1], t.shape[-1]))

        off_keys = take(self.keys, away).float()
        off_values = take(self.values, away)
        off_pos = pos.gather(1, away)
        off_valid = off_pos >= start
        index = self._build_index(off_keys, off_valid)
        index = _index_to_host(index)
        self.offloaded = Offloaded(index.keys, _to_host(off_values), off_pos.cpu(), off_valid.cpu(), index)
        self.keys, self.values, self.positions = take(self.keys, keep), take(self.values, keep), pos.gather(1, keep)
        self._train = []

    def _build_index(self, keys: torch.Tensor, valid: torch.Tensor) -> ExactIndex | IvfIndex:
        cfg = self.config
        if cfg.kind == "exact" or keys.shape[2] == 0:
            return ExactIndex(keys, valid)
        if cfg.kind == "key_ivf":
            return build_key_ivf(keys, valid, cfg.cluster_size, cfg.n_probe, cfg.kmeans_iters)
        if not self._train:
            raise RuntimeError("the query_ivf index is built from the prefill queries, but none were observed "
                               "(is the layer patched with decode='retrieval'?)")
        queries = torch.cat([q for q, _ in self._train], 2).float()
        qpos = torch.cat([p for _, p in self._train])
        if queries.shape[2] > cfg.n_train:
            pick = torch.linspace(0, queries.shape[2] - 1, cfg.n_train, device=queries.device).round().long()
            queries, qpos = queries.index_select(2, pick), qpos[pick]
        qvalid = qpos.view(1, -1) >= self._starts(keys.shape[0])
        return build_query_ivf(keys, valid, queries, qvalid, cfg.cluster_size, cfg.n_probe, cfg.kmeans_iters,
                               cfg.links)

    # -- a decode step -------------------------------------------------------------------------
    def search(self, q_host: torch.Tensor) -> SearchResult:
        """The index's top-`top_k` offloaded keys per query head; `q_host` `[B, Hq, D]` float32 on CPU."""
        return self.offloaded.index.search(q_host, self.top_k)

    def exact_search(self, q_host: torch.Tensor) -> SearchResult:
        """The exact top-`top_k` offloaded keys per query head (what recall is measured against)."""
        return ExactIndex(self.offloaded.keys, self.offloaded.valid).search(q_host, self.top_k)

    def attend_offloaded(self, q_host: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of each query head over its retrieved keys, on the CPU: `(out [B, Hq, Dv] float32,
        lse [B, Hq])` (lse -inf where nothing was retrieved)."""
        off = self.offloaded
        found = self.search(q_host)
        b, hq, k = found.indices.shape
        hkv = off.values.shape[1]
        self.counters["steps"] += 1
        self.counters["retrieved"] += float(torch.isfinite(found.scores).sum()) / (b * hq)
        self.counters["scanned"] += float(found.scanned.float().mean())
        if self.track_recall:
            r = recall(found, self.exact_search(q_host))
            self.counters["recall_sum"] += float(r.sum())
            self.counters["recall_n"] += r.numel()
        scores = found.scores * scale
        lse = torch.logsumexp(scores, -1)
        probs = torch.softmax(scores, -1).nan_to_num_(0.0)
        bi = torch.arange(b).view(b, 1, 1)
        hi = (torch.arange(hq) // (hq // hkv)).view(1, hq, 1)
        v = off.values[bi, hi, found.indices].float()  # [B, Hq, K, Dv]
        out = torch.matmul(probs.unsqueeze(-2), v).squeeze(-2)
        return out, lse

    # -- accounting ----------------------------------------------------------------------------
    def report(self) -> dict:
        """Bytes and tokens of each part, and what the decode steps retrieved and scanned."""
        gpu = 0 if self.keys is None else self.keys.numel() * self.keys.element_size() + \
            self.values.numel() * self.values.element_size()
        gpu_tokens = 0 if self.keys is None else self.keys.shape[-2]
        off = self.offloaded
        cpu_tokens = 0 if off is None else off.keys.shape[-2]
        per_token = 0 if gpu_tokens == 0 else gpu // gpu_tokens
        c = self.counters
        steps = max(c["steps"], 1)
        return {
            "gpu_tokens": gpu_tokens, "cpu_tokens": cpu_tokens,
            "gpu_bytes": gpu, "cpu_bytes": 0 if off is None else off.nbytes(),
            "dense_bytes": per_token * (gpu_tokens + cpu_tokens),  # the same KV, all on the device
            "retrieval_steps": c["steps"],
            "mean_retrieved": c["retrieved"] / steps, "mean_scanned": c["scanned"] / steps,
            "recall": c["recall_sum"] / c["recall_n"] if c["recall_n"] else None,
        }


class StaticRetrievalLayer(RetrievalLayer):
    """`RetrievalLayer` on a static cache (`cache_implementation="static"`, a `StaticCache`): fixed shapes
    for compiled decode steps.

    The prompt is written into a preallocated buffer of `max_cache_len` slots, as transformers'
    `StaticLayer` does (while reading the prompt the device holds its whole KV, as a dynamic cache does).
    At the first decode step the prompt is split as the dynamic layer splits it, and the buffer is
    replaced by the GPU part at a fixed size: the `n_sink + window` kept tokens, then one slot for each
    position the cache can still take (`max_cache_len` minus the prompt), at that position
    (`returned_positions`, fixed from then on). A step writes its slot in place from a device counter
    and returns the whole part; the slots not written yet sit at later positions, which the causal mask
    hides. So every step after the split has the same shapes and reads no host counter (no
    recompilation). The split and the CPU part run outside compiled graphs (`torch.compiler.disable`):
    a compiled step breaks its graph where it waits for the CPU search, which no CUDA graph can hold.
    `cumulative_length` counts the prompt; `get_seq_length` adds the device count of generated tokens.
    """

    is_compileable = True

    def __init__(self, max_cache_len: int, n_sink: int, window: int, top_k: int, index: IndexConfig,
                 track_recall: bool = False):
        super().__init__(n_sink, window, top_k, index, track_recall)
        self.max_cache_len = max_cache_len
        self.generated: torch.Tensor | None = None  # [] long on the device: tokens written since the split
        self.first_slot = 0  # the GPU part's slot of the first generated token

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        b, h = key_states.shape[:2]
        self.keys = key_states.new_zeros(b, h, self.max_cache_len, key_states.shape[-1])
        self.values = value_states.new_zeros(b, h, self.max_cache_len, value_states.shape[-1])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new, start = key_states.shape[-2], self.cumulative_length
        if self.offloaded is not None:
            if new > 1:
                raise NotImplementedError(_AFTER_SPLIT)
            return self._write(key_states, value_states)
        if new == 1 and start > self.n_sink + self.window:
            self._split(key_states, value_states)
            return self.keys, self.values
        if start + new > self.max_cache_len:
            raise ValueError(f"the static cache holds {self.max_cache_len} tokens per row; writing {new} after "
                             f"{start} needs {start + new} (a larger max_cache_len)")
        at = torch.arange(start, start + new, device=self.device)
        self.keys.index_copy_(2, at, key_states)
        self.values.index_copy_(2, at, value_states)
        self.cumulative_length += new
        return self.keys, self.values

    @torch.compiler.disable
    def _split(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Offload the prompt, allocate the fixed GPU part, write the decode token into its first free slot."""
        length = self.cumulative_length
        room = self.max_cache_len - length
        if room < 1:
            raise ValueError(f"the static cache holds {self.max_cache_len} tokens per row, all taken by the "
                             f"prompt: no slot left for a generated token (a larger max_cache_len)")
        b = key_states.shape[0]
        self.keys, self.values = self.keys[:, :, :length], self.values[:, :, :length]
        self.positions = torch.arange(length, device=self.device).expand(b, length)
        self._offload()  # the buffer is released: keys / values / positions are the kept tokens
        self.first_slot = self.keys.shape[2]

        def grow(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([t, t.new_zeros(*t.shape[:2], room, t.shape[-1])], 2)

        self.keys, self.values = grow(self.keys), grow(self.values)
        later = torch.arange(length, self.max_cache_len, device=self.device).expand(b, room)
        self.positions = self.returned_positions = torch.cat([self.positions, later], 1)
        self.generated = torch.zeros((), dtype=torch.long, device=self.device)
        for t in (self.keys, self.values, self.generated, self.positions):
            torch._dynamo.mark_static_address(t)
        self._write(key_states, value_states)

    def _write(self, key_states: torch.Tensor, value_states: torch.Tensor):
        slot = (self.generated + self.first_slot).view(1)
        self.keys.index_copy_(2, slot, key_states)
        self.values.index_copy_(2, slot, value_states)
        self.generated.add_(1)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.max_cache_len, 0

    def get_seq_length(self) -> int | torch.Tensor:
        return self.cumulative_length if self.generated is None else self.generated + self.cumulative_length

    def get_max_length(self) -> int:
        return self.max_cache_len

    def reset(self) -> None:
        super().reset()
        self.generated, self.first_slot = None, 0


def _index_to_host(index: ExactIndex | IvfIndex) -> ExactIndex | IvfIndex:
    keys, valid = _to_host(index.keys), index.valid.cpu()
    if isinstance(index, ExactIndex):
        return ExactIndex(keys, valid)
    return IvfIndex(keys, valid, index.centroids.cpu(), index.offsets.cpu(), index.members.cpu(), index.route,
                    index.n_probe)


def retrieval_report(cache) -> dict:
    """Totals over a cache's `RetrievalLayer`s: bytes on the GPU and on the CPU, what a dense cache of
    the same tokens would hold (`dense_bytes`), the GPU share of the KV (`gpu_fraction`), mean keys
    retrieved and scanned per step and query head, and the index's recall@top_k when tracked."""
    layers = [layer.report() for layer in getattr(cache, "layers", []) if isinstance(layer, RetrievalLayer)]
    if not layers:
        return {"layers": 0}
    out = {k: sum(d[k] for d in layers) for k in ("gpu_tokens", "cpu_tokens", "gpu_bytes", "cpu_bytes", "dense_bytes")}
    out["layers"] = len(layers)
    out["gpu_fraction"] = out["gpu_bytes"] / out["dense_bytes"] if out["dense_bytes"] else None
    for k in ("mean_retrieved", "mean_scanned"):
        out[k] = sum(d[k] for d in layers) / len(layers)
    recalls = [d["recall"] for d in layers if d["recall"] is not None]
    out["recall"] = sum(recalls) / len(recalls) if recalls else None
    out["per_layer"] = layers
    return out
