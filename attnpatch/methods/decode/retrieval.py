"""`retrieval`: RetrievalAttention — most of the prompt's KV in CPU memory behind a nearest-neighbour
index; each decode step attends the GPU part exactly and the retrieved CPU keys, merged by log-sum-exp."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from attnpatch.backends.reference import merge_partials, paged_decode_attention
from attnpatch.cache.retrieval_layer import INDEX_KINDS, IndexConfig, RetrievalLayer
from attnpatch.methods.base import DecodeContext, DecodeMethod, DecodeOutput
from attnpatch.options import option
from attnpatch.registry import register_decode
from attnpatch.sparsity import PageSelection


@register_decode("retrieval")
@dataclass
class Retrieval(DecodeMethod):
    """Keep `n_sink` + `window` prompt tokens (and every generated one) on the GPU; offload the rest to
    CPU memory with an index; attend the GPU part plus the index's `top_k` keys per query head.

    Choices (see ../shared/docs/methods.md §8):
    * The split happens at the first decode step (the prompt is read with full KV); the offloaded
      keys are stored in float32 (what the CPU scores, no per-step conversion), values in the model's
      dtype, in pinned memory when the model is on CUDA. GPU memory is the scarce resource; the CPU
      holds 1.5× the offloaded KV bytes of a bf16 cache (plus the index).
    * GQA: every query head retrieves its own `top_k` keys from its KV head's index (as the MInference
      port does; a KV group's heads often want different keys, §8.4).
    * The retrieved keys' attention runs on the CPU, where they are: copying `Hq·top_k` keys and
      values to the GPU each step (≈ 4.6 MB per layer for 9 heads × 2000 × d 64 in bf16) costs far more
      PCIe time than the CPU's `2·Hq·top_k·d` multiply-adds; only the query (`Hq·d`) goes down and the
      partial output with its log-sum-exp (`Hq·(d+1)`) comes back. The GPU part's kernels are queued
      before the CPU search starts, so the two overlap.
    * Index (`index`): "exact" (brute force, the port's default), "query_ivf" (attention-aware inverted
      lists: a key IVF whose lists also receive the exact top-`links` keys of up to `n_train` prefill
      queries per head wherever those queries' probes would miss them; `attnpatch.cache.retrieval_index`
      has the design and its measured recall), "key_ivf" (plain k-means over keys, the baseline the
      paper shows struggles with out-of-distribution queries). IVF lists hold about `cluster_size`
      keys; a query scans `n_probe` lists. The index is built on the device that holds the prompt's KV
      (the GPU on CUDA: k-means and the training queries' top keys), then moved to the CPU.
      Recall@top_k against exact search: `track_recall=True`, read with
      `attnpatch.cache.retrieval_report(cache)` (also bytes per part for the memory claim).
    * Defaults follow the MInference port: 128 sinks + 512 recent tokens, top_k 2000.
    * Static cache (`cache_implementation="static"`): the prompt fills the preallocated buffer; at the
      split the buffer gives way to a fixed-size GPU part (the kept tokens, then one slot per position
      the cache can still take), so GPU memory after the split is that part, not `max_cache_len` slots
      (`StaticRetrievalLayer`). Under `torch.compile` (not fullgraph) each step is compiled once and
      breaks its graph where the query goes to the CPU search, which runs eagerly
      (`torch.compiler.disable`; tested equal to eager, no recompilation per step); a CUDA graph cannot
      hold that wait (`fullgraph_reason`).

    `full_density` (what the matrix test checks against dense): exact index with `top_k` above any
    length, and a tiny GPU part, so short test prompts really go through the offload and the merge.
    """

    full_density: ClassVar[dict] = {"top_k": 1 << 30, "index": "exact", "n_sink": 1, "window": 2}
    fullgraph_reason: ClassVar[str | None] = (
        "each step hands the query to the CPU search and waits for it: a graph break (torch.compile without "
        "fullgraph runs it), which no CUDA graph can hold")

    n_sink: int = option(128, "first real tokens kept on the GPU", min=0)
    window: int = option(512, "most recent prompt tokens kept on the GPU (generated tokens are all kept)", min=1)
    top_k: int = option(2000, "offloaded keys retrieved per query head and step", min=1)
    index: str = option("exact", "index over the offloaded keys", choices=INDEX_KINDS)
    cluster_size: int = option(64, "IVF: average keys per inverted list", min=1)
    n_probe: int = option(16, "IVF: lists each query scans", min=1)
    n_train: int = option(1024, "query_ivf: prefill queries per query head the index is built from", min=1)
    links: int = option(16, "query_ivf: top keys each training query links to its cluster", min=1)
    kmeans_iters: int = option(8, "IVF: k-means iterations", min=0, max=100)
    track_recall: bool = option(False, "also run the exact search each step and record recall@top_k")

    def cache_layer(self, layer_idx: int, config: Any) -> RetrievalLayer:
        index = IndexConfig(self.index, self.cluster_size, self.n_probe, self.n_train, self.links, self.kmeans_iters)
        return RetrievalLayer(self.n_sink, self.window, self.top_k, index, self.track_recall)

    def observe_prefill(self, query: torch.Tensor, key: torch.Tensor, ctx: DecodeContext) -> None:
        if isinstance(ctx.cache_layer, RetrievalLayer):
            ctx.cache_layer.observe_queries(query)

    def select(self, query: torch.Tensor, key: torch.Tensor, ctx: DecodeContext) -> DecodeOutput | None:
        layer = ctx.cache_layer
        if not isinstance(layer, RetrievalLayer) or layer.offloaded is None:
            return None  # nothing offloaded (short prompt, or a sliding-window layer): dense over the cache
        value = layer.values
        if value is None or value.shape[2] != key.shape[2]:
            raise RuntimeError("retrieval: the keys of this step are not the ones its cache layer returned")
        q_host = _query_to_host(query)  # one sync; the GPU part's kernels are queued after it
        b, hkv, lk = key.shape[0], key.shape[1], key.shape[2]
        pages = PageSelection.all_pages(b, hkv, lk, 64, query.device)
        out_gpu, lse_gpu = paged_decode_attention(query, key, value, pages, ctx.scale, return_lse=True,
                                                  bounds=ctx.bounds)
        out_cpu, lse_cpu = _offloaded_part(layer, q_host, ctx.scale)
        device = query.device  # moved in the step's traced code (`_offloaded_part`)
        out, _ = merge_partials(out_gpu, lse_gpu, out_cpu.to(device, non_blocking=True),
                                lse_cpu.to(device, non_blocking=True))
        return DecodeOutput(out, f"retrieval: gpu part + {self.index} cpu part")


@torch.compiler.disable
def _query_to_host(query: torch.Tensor) -> torch.Tensor:
    """`[B, Hq, D]` float32 in CPU memory (outside compiled graphs: the step's one sync)."""
    return query[:, :, 0].float().cpu()


@torch.compiler.disable
def _offloaded_part(layer: RetrievalLayer, q_host: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The CPU part's `(out [B, Hq, 1, Dv], lse [B, Hq, 1])` in CPU memory, computed eagerly (the index
    search has data-dependent shapes and host counters a compiled graph would be guarded on).

    Returned on the CPU and moved to the device in the step's traced code: with the move in here, a compiled
    128K step (H100, inductor `reduce-overhead`) failed in the CUDA-graph trees ("graph recording observed an
    input tensor deallocate during graph recording that did not occur during replay"); with it there, it ran
    (bench/results/hf_decode_h100/retrieval_static_2026-12-06/)."""
    out, lse = layer.attend_offloaded(q_host, scale)
    return out.unsqueeze(2), lse.unsqueeze(2)
