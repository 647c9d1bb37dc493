"""The two kinds of method and their override points.

* A prefill method decides which keys each query block computes (`select`). Most do it through
  `EstimatedPrefill` (methods/estimated.py), whose one override point is `estimate`.
* A decode method decides what its KV cache keeps (`cache_layer`) and/or which cached pages a step
  reads (`select`, which sees its layer's cache object in the context). A method whose cache keeps
  keys where the backends cannot reach them (RetrievalAttention's CPU part) computes the step itself
  and returns a `DecodeOutput`; one that needs the prefill queries (to build an index, or to score
  tokens) reads them in `observe_prefill`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, Protocol

import torch

from attnpatch.options import Knob
from attnpatch.sparsity import BlockSelection, BoundPages, KeyBounds, PageSelection, TokenSelection


class DenseFallback(NamedTuple):
    """Returned by `select` when the method declines an input; the layer then runs dense attention."""

    reason: str


class DecodeOutput(NamedTuple):
    """Returned by `DecodeMethod.select` when the method computed the step's attention itself:
    `out` `[B, Hq, 1, Dv]` over every key the method attends (for instance a GPU part and a CPU
    part merged by their log-sum-exps); `backend` names what ran, for the stats."""

    out: torch.Tensor
    backend: str


@dataclass(frozen=True)
class PrefillContext:
    """What a prefill method may look at besides Q and K.

    `bounds` says which keys each query may see besides the causal rule (padding, sliding window);
    `key_start` is each row's first real key (`[B]`, None without padding), kept for methods that
    only need that.
    """

    layer_idx: int
    scale: float
    bounds: KeyBounds
    sliding_window: int | None  # the layer's window, if it is a sliding-window layer

    @property
    def key_start(self) -> torch.Tensor | None:
        return self.bounds.key_start


@dataclass(frozen=True)
class DecodeContext:
    """What a decode method may look at besides the query and the cached keys: its layer's cache
    object (`cache_layer`, None when the model runs without a cache) and the key bounds."""

    layer_idx: int
    scale: float
    bounds: KeyBounds
    sliding_window: int | None
    cache_layer: Any = None


@dataclass
class PrefillMethod:
    """Base of prefill methods: decide which key blocks (or key positions) each query block computes."""

    name: ClassVar[str] = ""
    is_dense: ClassVar[bool] = False
    # Options under which the method keeps every key, so it must equal dense attention (tests check it).
    full_density: ClassVar[dict[str, Any]] = {}
    # On sliding-window layers: "window" runs the layer's own window (the method applies to
    # full-attention layers; stats say so), "select" lets the method select inside the window.
    on_window_layers: ClassVar[str] = "window"
    # "block" (BlockSelection of `block_size` blocks) or "token" (TokenSelection): the unit stats count in.
    granularity: ClassVar[str] = "block"
    # The per-head option calibration searches (`attnpatch.calibrate`); None: not calibratable that way.
    knob: ClassVar[Knob | None] = None
    # The shortest input (keys) from which the method at its defaults, estimate included, was measured
    # faster than SDPA's dense cuDNN kernel on the H200 (attention layer; bench/results/README.md).
    # Backend "auto" on CUDA runs shorter prefills dense, with the reason (`BackendPlan.speed_gate`).
    # None: slower at every length measured (auto always runs dense); 0: no gate (dense, or not measured).
    fast_from: ClassVar[int | None] = 0

    def select(self, query: torch.Tensor, key: torch.Tensor, ctx: PrefillContext
               ) -> BlockSelection | TokenSelection | DenseFallback:
        """query `[B, Hq, Lq, D]`, key `[B, Hkv, Lk, D]` (post-RoPE, with the cache)."""
        raise NotImplementedError


class Attend(Protocol):
    """What a compiled decode step runs its page lists with (the dispatcher's, on the patch's backends)."""

    def __call__(self, pages: PageSelection | None) -> torch.Tensor:
        """`[B, Hq, 1, Dv]`: attention over `pages` (None: every visible key)."""

    def with_page_lse(self, pages: PageSelection) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`(out, page_lse)`: `page_lse` `[B, Hq, ceil(L / page_size)]` float32 holds each listed page's
        natural-log log-sum-exp of its visible keys' scaled scores per query head (-inf on the others),
        written in the same pass over K; None where the decode backend cannot (the caller ranks itself)."""

    def bound(self, pages: BoundPages) -> torch.Tensor | None:
        """`[B, Hq, 1, Dv]`: attention over the selection `pages` describes, made in the launch that attends;
        None where no decode backend can (the caller selects and calls `attend` itself)."""


@dataclass
class DecodeMethod:
    """Base of decode methods: what the KV cache keeps (`cache_layer`) and what each step reads (`select`).

    A method overrides one of the two (or both).
    """

    name: ClassVar[str] = ""
    is_dense: ClassVar[bool] = False
    # Options under which the method reads every cached key, so it must equal dense attention.
    full_density: ClassVar[dict[str, Any]] = {}
    # Why the method cannot run on a static (preallocated, compileable) cache, or None when it can:
    # a patch refuses `cache_implementation="static"` with this reason instead of silently running dense.
    static_cache_reason: ClassVar[str | None] = None
    # Why a decode step of the method cannot be compiled (`torch.compile` of the model), or None when it
    # can: a compiled step raises this reason instead of recompiling at every step.
    compiled_step_reason: ClassVar[str | None] = None
    # Why a compiled decode step of the method is not one graph (it compiles without fullgraph, and no
    # CUDA graph replays it), or None when it is.
    fullgraph_reason: ClassVar[str | None] = None

    def select(self, query: torch.Tensor, key: torch.Tensor, ctx: DecodeContext
               ) -> PageSelection | DecodeOutput | None:
        """Which cached pages one decode step reads (None: all of them, through SDPA), or the step's
        output when the method computes it itself (`DecodeOutput`).

        query `[B, Hq, 1, D]`, key `[B, Hkv, L, D]` as returned by the cache.
        """
        return None

    def compiled_step(self, query: torch.Tensor, key: torch.Tensor, ctx: DecodeContext, attend: Attend) -> torch.Tensor:
        """One decode step inside `torch.compile`: the output `[B, Hq, 1, Dv]`. `attend(pages)` runs a
        page list on the patch's decode backend (None: every visible key, as a dense decode);
        `attend.with_page_lse(pages)` also returns each listed page's log-sum-exp (`Attend`). By default
        the step is `select`'s; a method whose eager schedule is kept on the host (Python counters a
        compiled step would be guarded on and recompile) overrides it with a schedule on the device."""
        pages = self.select(query, key, ctx)
        return pages.out if isinstance(pages, DecodeOutput) else attend(pages)

    def observe_prefill(self, query: torch.Tensor, key: torch.Tensor, ctx: DecodeContext) -> None:
        """Called on every prefill call (`Lq > 1`) of the layer, before its attention runs, with the
        queries `[B, Hq, Lq, D]` and the keys the cache returned (the cache has stored the call's
        keys already). Lets a method read prefill queries; changes nothing by default."""
        return None

    @property
    def observes_prefill(self) -> bool:
        """Whether the method overrides `observe_prefill` (so the dispatch must call it)."""
        return type(self).observe_prefill is not DecodeMethod.observe_prefill

    @property
    def period(self) -> int:
        """Decode steps after which the method's per-step work repeats: 1 when every step costs alike;
        `recycled`: its stride (one full refresh per period). A timing of fewer steps than a period, or of a
        number of steps that is not a multiple of it, misstates the cost per token (`attnpatch.bench.hf_decode`
        times whole periods)."""
        return 1

    def decode_cache_tokens(self, context: int) -> int:
        """How many tokens the decode steps' cache holds once the method has read a context of `context`
        tokens (what a decode benchmark fills its cache to): all of them, unless the method's reading
        keeps fewer (`infiniretri`)."""
        return context

    def cache_layer(self, layer_idx: int, config: Any):
        """A transformers cache layer for a full-attention layer, or None for the default.

        A layer whose returned keys are not the contiguous positions `0..L-1` must expose the
        original position of every returned key as `returned_positions` (a `[L]` long tensor).
        """
        return None

    @property
    def keeps_own_cache(self) -> bool:
        """Whether the method overrides `cache_layer` (so a patch must install its cache layers)."""
        return type(self).cache_layer is not DecodeMethod.cache_layer
