"""HF-path decode benchmark: ms per generated token of a Llama-3.1-8B-shaped model (random weights, bf16)
decoding from a static cache of L tokens, eager and under `torch.compile` (CUDA-graph replay), per batch.

    python -m attnpatch.bench.hf_decode --out DIR --layers 32 --lengths 32768,65536,131072 \
        --batches 1,4,8 --methods all --modes eager,compiled --budget-s 540

Per (L, B): a `StaticCache` of `L + headroom` slots is filled to L tokens, then `--steps` greedy decode
steps (`model(next_token, cache=...)`, LM head included) are timed with CUDA events, `--repeats` times
after `--warmup` steps (compiled rows: the compilation and CUDA-graph recording happen in the warm-up,
its time is reported as `compile_s`); the row's value is the median ms per token. Mode `generate` times the
user's path instead: `model.generate(ids, max_new_tokens=n)` from the same filled static cache (`ids`: the
cached tokens' placeholders and the next token), which on CUDA compiles the decode steps itself (transformers'
`compile_config`: inductor, CUDA graphs) and adds its own per-step work (logits processing, stopping checks,
a host sync per step); per token = (time of `1 + steps` tokens − time of 1 token) / steps, so generate's setup
and its uncompiled first forward drop out. Mode `generate-deferred` is the same with transformers' own
`DeferredStopCheck`, which reads the stop flag one step late so that the host prepares the next step while the GPU
runs this one (transformers enables it on `mps` only); it needs a device that records events (CUDA, not the CPU).
Its rows also time the synchronous `generate` on the same compiled graphs (`sync_times_ms`, in the note) and check
that the tokens are equal. A method whose steps' cost repeats over a period (`recycled`'s stride:
`DecodeMethod.period`) runs whole periods in every mode.

**The prefill is not run**: the cache is filled with Gaussian K/V through each cache layer's own
`update()` (so a decode method's cache layer also builds its metadata, e.g. page summaries), after a
one-token forward that lets the patch install its cache layers. A 128K prefill of the 32-layer model
would take most of a 600 s call; prefill speed is `hf_prefill`'s job. On random K/V, attention is flat:
a method that skips by score (blasst) finds little to skip, one that reads a fixed budget (quest) reads
exactly its budget; each row reports what ran (`patch.stats()` of an eager step) and the skipped share.

Rows per (L, B) and mode: the unpatched model (SDPA as torch picks it, then forced to efficient, cuDNN and flash
through `sdpa_kernel`; flash takes no mask, which a static cache always has, so it fails with the reason), `dense`
through attnpatch's dispatch (→ SDPA), the Triton decode kernel over every page (`dense` kernel rows: `triton all
pages`), and every registered decode method (`--methods all`, or a list; options through `--decode-options
name:key=value,...`, a bare name for the defaults). A method that cannot run on a static cache
(`DecodeMethod.static_cache_reason`) runs its eager rows on a DynamicCache and its compiled rows are skipped with the
reason; one whose compiled step breaks its graph (`fullgraph_reason`: retrieval waits for its CPU search) is compiled
under `--no-fullgraph` only. The KV column adds what a method moved to CPU memory. A method whose reading keeps fewer
tokens than it read (infiniretri: `DecodeMethod.decode_cache_tokens`) decodes over a cache of that many tokens, said
in the row's note. Speedups: over the best dense row of the same (L, B) over both modes, and over the best dense row
of the same mode. KV cache memory is reported per row; a (L, B) whose cache does not fit in free GPU memory is skipped
with the reason. `--budget-s`: rows that would start after that many seconds are skipped (noted), so a subset finishes
in one call. `--device cpu --tiny` runs a tiny config (tests).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from attnpatch.adapters.cache_arg import cache_kwarg
from attnpatch.bench.hf_prefill import LLAMA31_8B, TINY, build_model
from attnpatch.bench.timing import timed_ms
from attnpatch.cache.retrieval_layer import retrieval_report
from attnpatch.methods.base import DecodeContext, DecodeMethod
from attnpatch.options import resolved_options
from attnpatch.sparsity import PageSelection

MODES = ("eager", "compiled", "generate", "generate-deferred")
GENERATE_MODES = ("generate", "generate-deferred")
SDPA_FORCED = ("efficient", "cudnn", "flash")
FILL_CHUNK = 8192  # tokens per cache update while filling
BASELINE_KEYS = ("unpatched", *SDPA_FORCED, "dense", "triton")


@dataclass
class AllPages(DecodeMethod):
    """Every page of the cache, no skipping: the Triton decode kernel as a dense decode (bench only)."""

    name: ClassVar[str] = "triton all pages"
    page_size: int = 64

    def select(self, query: torch.Tensor, key: torch.Tensor, ctx: DecodeContext) -> PageSelection:
        return PageSelection.all_pages(query.shape[0], key.shape[1], key.shape[2], self.page_size, query.device,
                                       key_end=ctx.bounds.key_end)  # a static cache: its written pages


@dataclass
class Config:
    """One row's recipe: unpatched (optionally forcing an SDPA backend) or a patch."""

    name: str
    kind: str  # dense | sparse
    decode: str | None = None  # a decode method spec ("blasst:a=16"); None: unpatched
    sdpa: str | None = None
    all_pages: bool = False
    key: str = ""  # the name --baselines selects a dense row by


@dataclass
class Row:
    name: str
    kind: str
    mode: str
    length: int
    batch: int
    ms_per_token: float = float("nan")
    times_ms: list[float] = field(default_factory=list)
    tokens_per_s: float | None = None
    kv_cache_gib: float | None = None  # K/V tensors the cache layers hold (on the GPU when run there)
    kv_cpu_gib: float | None = None  # K/V moved to CPU memory (retrieval)
    peak_gib: float | None = None
    compile_s: float | None = None
    speedup_vs_best_dense: float | None = None
    speedup_vs_best_dense_same_mode: float | None = None
    backends: dict[str, int] = field(default_factory=dict)
    backend_declined: dict[str, int] = field(default_factory=dict)
    dense_fallbacks: dict[str, int] = field(default_factory=dict)
    decode_skipped_fraction: float | None = None
    top_kernels: list[dict[str, Any]] = field(default_factory=list)  # --profile: GPU time per step by kernel
    kernel_ms_per_step: float | None = None  # --profile: all kernels' GPU time per step
    kernels_per_step: float | None = None  # --profile: kernel launches per step
    host_functions: list[dict[str, Any]] = field(default_factory=list)  # --host-profile: Python time per step
    host_ms_per_step: float | None = None  # --host-profile: the profiled steps' wall time, per step
    options: dict[str, Any] = field(default_factory=dict)  # the decode method's options as it ran, defaults too
    generate_calls_ms: list[list[float]] = field(default_factory=list)  # generate rows: [1 + steps, 1] tokens
    matches_sync_tokens: bool | None = None  # generate-deferred rows: its tokens equal the synchronous generate's
    sync_times_ms: list[float] = field(default_factory=list)  # generate-deferred rows: the synchronous generate's
    steps_per_run: int | None = None  # --steps rounded up to whole periods of the method (`DecodeMethod.period`)
    note: str = ""


def decode_configs(methods: list[str], options: dict[str, list[str]]) -> list[Config]:
    """Dense baselines, then one row per decode method and setting (`options`: name → ["k=v,k=v", ...];
    a method without settings gets one row with its defaults)."""
    rows = [Config("unpatched (SDPA default)", "dense", key="unpatched")]
    rows += [Config(f"unpatched, SDPA {b}", "dense", sdpa=b, key=b) for b in SDPA_FORCED]
    rows += [Config("dense (attnpatch dispatch → SDPA)", "dense", decode="dense", key="dense"),
             Config(AllPages.name, "dense", decode="dense", all_pages=True, key="triton")]
    for name in methods:
        for setting in options.get(name, [""]):
            spec = f"{name}:{setting}" if setting else name
            rows.append(Config(spec, "sparse", decode=spec))
    return rows


def registered_methods() -> list[str]:
    """Every registered decode method but `dense` (the baselines cover it)."""
    from attnpatch.registry import method_infos

    return [m.name for m in method_infos("decode") if m.name != "dense"]


def parse_decode_options(items: list[str] | None) -> dict[str, list[str]]:
    """["quest:budget=4096", "quest:budget=8192", ...] → {"quest": ["budget=4096", "budget=8192"]} (a
    method named twice gets a row per setting; a bare name, "quest", is a row at its defaults, ""); names
    checked against the registry."""
    from attnpatch.registry import get_method

    out: dict[str, list[str]] = {}
    for item in items or []:
        name, sep, rest = item.partition(":")
        if sep and not rest.strip():
            raise ValueError(f"--decode-options entries look like name or name:key=value[,key=value], got {item!r}")
        out.setdefault(get_method(name.strip(), "decode").name, []).append(rest.strip())
    return out


def decode_period(spec: str | None) -> int:
    """Decode steps after which a row's per-step work repeats (`DecodeMethod.period`; 1 unpatched)."""
    if spec is None:
        return 1
    from attnpatch.spec import PatchSpec

    return PatchSpec.build("dense", spec).build_decode().period


def _method_class(spec: str | None) -> type[DecodeMethod] | None:
    """The decode method class a row's spec names (None: an unpatched row)."""
    if spec is None:
        return None
    from attnpatch.registry import get_method

    return get_method(spec.partition(":")[0], "decode").cls


def kv_bytes(config, batch: int, slots: int, dtype: torch.dtype) -> int:
    """Bytes of a static K/V cache of `slots` tokens for every layer of `config`."""
    d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    elem = torch.finfo(dtype).bits // 8
    return 2 * config.num_hidden_layers * batch * config.num_key_value_heads * slots * d * elem


def cache_gib(cache) -> float:
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total / 2**30


def fill_cache(model, cache, length: int, batch: int, seed: int) -> torch.Tensor:
    """One real token through the model (installs a patch's cache layers), then Gaussian K/V up to
    `length` tokens through every layer's `update`. Returns the next input token `[B, 1]`."""
    device = model.device
    g = torch.Generator(device=device).manual_seed(seed)
    first = torch.randint(0, model.config.vocab_size, (batch, 1), device=device, generator=g)
    with torch.no_grad():
        logits = model(input_ids=first, use_cache=True, **{cache_kwarg(model): cache}).logits
    cfg = model.config
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    for i in range(cfg.num_hidden_layers):
        done = 1
        while done < length:
            n = min(FILL_CHUNK, length - done)
            shape = (batch, cfg.num_key_value_heads, n, d)
            k = torch.randn(shape, device=device, dtype=model.dtype, generator=g)
            v = torch.randn(shape, device=device, dtype=model.dtype, generator=g)
            cache.update(k, v, i)
            done += n
    return logits[:, -1:].argmax(-1)


def rewind(cache, length: int) -> None:
    """Set every static layer back to `length` written tokens (in place: static addresses kept)."""
    for layer in cache.layers:
        cum = getattr(layer, "cumulative_length", None)
        if isinstance(cum, torch.Tensor):
            cum.fill_(length)
        if hasattr(layer, "cumulative_length_int"):
            layer.cumulative_length_int = length


def _sdpa_context(name: str | None):
    if name is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                        "flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}[name])


@contextlib.contextmanager
def _no_gc():
    """Python's garbage collector collected before and paused during a timed call: a collection of the
    compiler's many objects inside one `generate` call costs tens of ms, which is noise, not the method."""
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _time_steps(step, token: torch.Tensor, steps: int, repeats: int, device: torch.device) -> list[float]:
    """ms per token of `repeats` runs of `steps` chained greedy steps (CUDA events around each run; the garbage
    collector paused during each run)."""
    out = []
    for _ in range(repeats):
        with _no_gc():
            out.append(_run_steps_ms(step, token, steps, device))
    return out


def _run_steps_ms(step, token: torch.Tensor, steps: int, device: torch.device) -> float:
    """ms per token of one run of `steps` chained greedy steps."""
    def run() -> None:
        tok = token
        for _ in range(steps):
            tok = step(tok)

    return timed_ms(run, device)[0] / steps


def _generator(model, cache, token: torch.Tensor, held: int, sdpa: str | None, deferred: bool = False
               ) -> Callable[[int], tuple[float, torch.Tensor]]:
    """`generate(n)`: `model.generate` of `n` greedy tokens from the static `cache` rewound to `held` tokens
    (the prompt's ids are zeros but the last, `token`: the cache already holds their K/V, so generate's first
    forward is that one token). Returns the call's milliseconds (CUDA events, else wall clock) and the new
    tokens `[B, n]`. On CUDA, transformers compiles the decode steps of a static cache itself (its
    `compile_config`). `deferred`: under transformers' deferred stop check (`_deferred_stop_check`)."""
    batch, device = token.shape[0], token.device
    ids = torch.zeros(batch, held + 1, dtype=torch.long, device=device)
    ids[:, -1:] = token
    mask = torch.ones_like(ids)

    def generate(n: int) -> tuple[float, torch.Tensor]:
        rewind(cache, held)
        with torch.no_grad(), _sdpa_context(sdpa), _no_gc(), \
                (_deferred_stop_check() if deferred else contextlib.nullcontext()):
            elapsed, out = timed_ms(lambda: model.generate(
                ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                **{cache_kwarg(model): cache}), device)
        if out.shape[1] != held + 1 + n:
            raise RuntimeError(f"generate returned {out.shape[1] - held - 1} new tokens, asked for {n}")
        return elapsed, out[:, held + 1:]

    return generate


def _has_events(device: torch.device) -> bool:
    """Whether `device` can record the events transformers' deferred stop check waits on (the CPU cannot)."""
    try:
        torch.Event(device=device, blocking=True).record()
    except RuntimeError:
        return False
    return True


@functools.cache
def _stop_check_on_any_device() -> tuple[type, type]:
    """`(transformers' DeferredStopCheck, a subclass allowed on any device)`, made once."""
    import transformers
    import transformers.generation.utils as generation

    base = getattr(generation, "DeferredStopCheck", None)
    if base is None:
        raise RuntimeError(f"transformers {transformers.__version__} has no DeferredStopCheck "
                           "(mode generate-deferred)")

    class OnAnyDevice(base):
        @staticmethod
        def is_supported(device, cache, cache_is_returned, is_assistant) -> bool:
            return not is_assistant

        def __init__(self, input_ids, max_length, cache, cache_is_returned, streamer=None):
            super().__init__(input_ids, max_length, cache, False, streamer)

    return base, OnAnyDevice


@contextlib.contextmanager
def _deferred_stop_check():
    """transformers' `DeferredStopCheck` on any device for the `generate` calls inside: the stop flag is copied
    without blocking and read one step late, so the host prepares the next step while the GPU runs this one.
    transformers uses it on `mps` only, and for a cache the caller passed in only where the cache can be
    cropped (its extra step after an end-of-sequence token is then undone). The benchmark's calls stop at their
    length, which is checked without deferral, and rewind the cache themselves, so the cache is not handed to it."""
    import transformers.generation.utils as generation

    base, on_any_device = _stop_check_on_any_device()
    generation.DeferredStopCheck = on_any_device
    try:
        yield
    finally:
        generation.DeferredStopCheck = base


def _time_generate(generate: Callable[[int], tuple[float, torch.Tensor]], steps: int, repeats: int
                   ) -> tuple[list[float], list[list[float]]]:
    """ms per token of `repeats` pairs of `generate` calls: `1 + steps` tokens less 1 token, over `steps` (the
    first token comes from generate's uncompiled first forward and its setup, which the difference removes),
    and each pair's two call times in ms."""
    calls = [[generate(1 + steps)[0], generate(1)[0]] for _ in range(repeats)]
    return [(long - short) / steps for long, short in calls], calls


def profile_steps(run: Callable[[], object], steps: int, device: torch.device, top: int = 20
                  ) -> tuple[list[dict], float, float]:
    """`(top kernels, kernel ms per step, kernels per step)`: the kernels that took the most GPU time over
    `run()`, which decodes `steps` steps (torch.profiler), per step — where a step's time goes (attention,
    weights' GEMMs, cache writes, mask building) — and the sum and count of all of them (the rest of a step's
    wall time is launch gaps)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    attr = "device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
    events.sort(key=lambda e: -getattr(e, attr))
    total = sum(getattr(e, attr) for e in events) or 1.0
    kernels = [{"kernel": e.key[:120], "ms_per_step": getattr(e, attr) / 1e3 / steps,
                "calls_per_step": e.count / steps, "share": getattr(e, attr) / total} for e in events[:top]]
    return kernels, total / 1e3 / steps, sum(e.count for e in events) / steps


def host_profile_steps(run: Callable[[], object], steps: int, device: torch.device, top: int = 25
                       ) -> tuple[list[dict], float]:
    """`(top functions, ms per step)`: where a step's host time goes — cProfile over `run()`, which decodes
    `steps` steps, the `top` functions by their own time per step and the `top` by cumulative time (calls per
    step, own and cumulative ms; sorted by own time; cProfile's own overhead inflates every figure, the ranking
    is what it is for) and the profiled wall time per step."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    prof.disable()
    wall = (time.perf_counter() - t0) * 1e3 / steps
    rows = []
    for (path, line, fn), (_, calls, own, cum, _) in pstats.Stats(prof).stats.items():
        where = "/".join(Path(path).parts[-2:]) if path != "~" else "builtin"
        rows.append({"function": f"{where}:{line}({fn})", "calls_per_step": calls / steps,
                     "own_ms_per_step": own * 1e3 / steps, "cum_ms_per_step": cum * 1e3 / steps})
    top_cum = {id(r) for r in sorted(rows, key=lambda r: -r["cum_ms_per_step"])[:top]}
    rows.sort(key=lambda r: -r["own_ms_per_step"])
    return [r for rank, r in enumerate(rows) if rank < top or id(r) in top_cum], wall


@dataclass
class Bench:
    """Shared state of one run: the model, options, the time budget."""

    model: Any
    device: torch.device
    steps: int
    repeats: int
    warmup: int
    compile_mode: str
    compile_backend: str
    fullgraph: bool
    budget_s: float
    page_size: int
    profile: bool = False
    host_profile: bool = False
    max_period: int = 1  # the longest `DecodeMethod.period` among the rows: the cache's headroom holds its runs
    started: float = field(default_factory=time.perf_counter)
    compile_estimate_s: float = 0.0
    log: Any = print

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def run_steps(self, period: int) -> int:
        """Steps per timed run: `--steps` rounded up to whole periods, so that every run holds as many of a
        periodic method's costly steps (a `recycled` refresh) as the average step does."""
        return -(-self.steps // period) * period

    def headroom(self) -> int:
        """Cache slots past L: warm-up, the timed runs, `--profile`'s run of the steps, and a margin."""
        runs = self.repeats + int(self.profile) + int(self.host_profile)
        return (self.warmup + 4) + runs * self.run_steps(self.max_period) + 8

    def run(self, cfg: Config, mode: str, length: int, batch: int, shared: dict) -> Row:
        """One row; never raises (a failure is a row with a note)."""
        import attnpatch

        row = Row(cfg.name, cfg.kind, mode, length, batch)
        left = self.budget_s - self.elapsed()
        if left <= 0 or (mode == "compiled" and left < self.compile_estimate_s):
            row.note = f"skipped: time budget (--budget-s {self.budget_s:g}, {self.elapsed():.0f} s used)"
            return row
        cls = _method_class(cfg.decode)
        dynamic = cls is not None and cls.static_cache_reason is not None  # a method refusing a static cache
        reason = None
        if mode == "compiled" and dynamic:
            reason = f"{cls.static_cache_reason} (a compiled step needs the static cache)"
        elif mode == "compiled" and cls is not None:
            reason = cls.compiled_step_reason
            if reason is None and cls.fullgraph_reason is not None and self.fullgraph:
                reason = f"{cls.fullgraph_reason} (--no-fullgraph times it)"
        if mode in GENERATE_MODES and dynamic:
            reason = f"{cls.static_cache_reason} (the generate rows decode from the static cache)"
        if mode == "generate-deferred" and not _has_events(self.device):
            reason = f"transformers' deferred stop check records device events, which {self.device.type} lacks"
        if reason is not None:  # said plainly, not as dynamo's wrapper of the error the compiled step raises
            row.note = f"skipped: {reason}"
            return row
        model, device = self.model, self.device
        patch = None
        try:
            if cfg.decode is not None:
                patch = attnpatch.patch_model(model, decode=cfg.decode)
                if cfg.all_pages:
                    for plan in patch.state.plans:
                        plan.decode = AllPages(self.page_size)
                row.options = resolved_options(patch.state.plans[0].decode)
                row.steps_per_run = self.run_steps(patch.state.plans[0].decode.period)
            held = _tokens_held(patch, length)
            if held != length:
                row.note = f"reads {length} tokens; its decode steps' cache holds {held}"
            cache = self._cache(held, batch, shared, own=bool(patch is not None and patch._own_cache),
                                dynamic=dynamic, shared_length=held == length)
            token = shared["token"]
            row.kv_cache_gib = cache_gib(cache)
            kw = {cache_kwarg(model): cache, "use_cache": True}
            forward = model
            if mode == "compiled":
                torch._dynamo.reset()
                forward = torch.compile(model, backend=self.compile_backend, fullgraph=self.fullgraph,
                                        dynamic=False, **({"mode": self.compile_mode}
                                                          if self.compile_backend == "inductor" else {}))

            graphs = mode == "compiled" and (self.compile_backend == "cudagraphs" or (
                self.compile_backend == "inductor" and self.compile_mode == "reduce-overhead"))

            def step(tok):
                if graphs:  # each step's outputs may be overwritten by the next replay
                    torch.compiler.cudagraph_mark_step_begin()
                with torch.no_grad(), _sdpa_context(cfg.sdpa):
                    logits = forward(input_ids=tok, **kw).logits
                return logits[:, -1:].argmax(-1)

            if patch is not None:  # one eager step for the stats (a compiled step keeps none)
                patch.reset_stats()  # not the cache fill's one-token forward
                with torch.no_grad(), _sdpa_context(cfg.sdpa):
                    model(input_ids=token, **kw)
                stats = patch.stats()
                row.backends, row.backend_declined = stats.backends, stats.backend_declined
                row.dense_fallbacks = stats.dense_fallbacks
                layers = [d for d in stats.layers if d.get("decode_skipped_fraction") is not None]
                if layers:
                    row.decode_skipped_fraction = statistics.fmean(d["decode_skipped_fraction"] for d in layers)
            if mode in GENERATE_MODES and retrieval_report(cache)["layers"]:
                row.note = ("skipped: its cache moved the prompt's K/V to CPU memory at the first decode step, so "
                            "generate cannot start again from the filled cache (its eager and compiled rows time "
                            "the steps)")
                return row
            rewind(cache, held)
            steps = row.steps_per_run = row.steps_per_run or self.steps
            if steps != self.steps:
                row.note = "; ".join(filter(None, [row.note, f"runs of {steps} steps: whole periods of the method"]))
            t0 = time.perf_counter()
            tok = token
            if mode in GENERATE_MODES:
                generate = _generator(model, cache, token, held, cfg.sdpa, deferred=mode == "generate-deferred")
                generate(1 + max(self.warmup + 3, steps))  # transformers compiles the steps (CUDA), records graphs
                generate(1)
                row.compile_s = time.perf_counter() - t0
                row.times_ms, row.generate_calls_ms = _time_generate(generate, steps, self.repeats)
            else:
                for _ in range(self.warmup + (3 if mode == "compiled" else 0)):
                    tok = step(tok)
                if mode == "compiled":
                    row.compile_s = time.perf_counter() - t0
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            if mode != "eager":
                self.compile_estimate_s = max(self.compile_estimate_s, row.compile_s)
            if mode not in GENERATE_MODES:
                row.times_ms = _time_steps(step, tok, steps, self.repeats, device)
            row.ms_per_token = statistics.median(row.times_ms)
            row.kv_cache_gib = cache_gib(cache)  # after the steps: a method that offloads holds less now
            offloaded = retrieval_report(cache)
            if offloaded["layers"]:
                row.kv_cpu_gib = offloaded["cpu_bytes"] / 2**30
            row.tokens_per_s = 1e3 * batch / row.ms_per_token
            if device.type == "cuda":
                row.peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
            if mode == "generate-deferred":  # the synchronous generate on the same graphs: its time and tokens
                sync = _generator(model, cache, token, held, cfg.sdpa)
                row.sync_times_ms, _ = _time_generate(sync, steps, self.repeats)
                row.matches_sync_tokens = torch.equal(generate(1 + steps)[1], sync(1 + steps)[1])
                said = "the same tokens" if row.matches_sync_tokens else "OTHER TOKENS"
                row.note = "; ".join(filter(None, [row.note, f"synchronous stop check on the same graphs: "
                                                   f"{statistics.median(row.sync_times_ms):.3f} ms a token, "
                                                   f"{said}"]))
            if mode in GENERATE_MODES:  # what the profiles run: one call of a whole run (its first token included)
                def run_steps() -> object:
                    return generate(1 + steps)
            else:
                def run_steps(tok: torch.Tensor = tok) -> object:
                    for _ in range(steps):
                        tok = step(tok)
                    return tok
            if self.profile:
                row.top_kernels, row.kernel_ms_per_step, row.kernels_per_step = profile_steps(run_steps, steps, device)
            if self.host_profile and mode != "compiled":
                row.host_functions, row.host_ms_per_step = host_profile_steps(run_steps, steps, device)
            self.log(f"L={length} B={batch} {mode} {cfg.name}: {row.ms_per_token:.3f} ms/token "
                     f"{row.backends or ''}")
        except Exception as e:  # noqa: BLE001  (a failing configuration is a result, not a crash)
            row.note = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
            self.log(f"L={length} B={batch} {mode} {cfg.name}: FAILED {row.note}")
        finally:
            if patch is not None:
                patch.unpatch()
            if patch is not None and patch._own_cache:
                shared.pop("own", None)
            if mode != "eager":
                torch._dynamo.reset()
            if device.type == "cuda":
                with contextlib.suppress(Exception):
                    torch.cuda.synchronize(device)
                torch.cuda.empty_cache()
        return row

    def _cache(self, length: int, batch: int, shared: dict, own: bool, dynamic: bool = False,
               shared_length: bool = True):
        """The shared static cache of this (L, B) rewound to L, or (a method with its own cache
        layers) a fresh one filled under the patch: a DynamicCache for a method that cannot run on a
        static one (eager rows only, each timed run appends its few tokens).
        `shared_length=False` (a method that decodes over fewer tokens than it read): a fresh cache of
        `length` tokens that leaves the shared full-length cache in place."""
        from transformers.cache_utils import DynamicCache, StaticCache

        key = "own" if own else "plain"
        if key in shared and not dynamic and shared_length:
            rewind(shared[key], length)
            return shared[key]
        for other in ("plain", "own") if shared_length else ():
            shared.pop(other, None)  # one cache alive at a time
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        cache = DynamicCache(config=self.model.config) if dynamic else \
            StaticCache(config=self.model.config, max_cache_len=length + self.headroom())
        shared["token"] = fill_cache(self.model, cache, length, batch, seed=length + batch)
        if not own and not dynamic and shared_length:
            shared[key] = cache
        return cache


def _tokens_held(patch, length: int) -> int:
    """Tokens the decode steps' cache holds after the patch's decode method read `length` (`length`
    unpatched)."""
    methods = [] if patch is None else [p.decode for p in patch.state.plans if p.decode is not None]
    return methods[0].decode_cache_tokens(length) if methods else length


def fits(config, batch: int, slots: int, dtype: torch.dtype, device: torch.device) -> str | None:
    """Why a static cache of `slots` tokens at batch `batch` does not fit in free GPU memory, or None."""
    if device.type != "cuda":
        return None
    need = kv_bytes(config, batch, slots, dtype)
    free, _ = torch.cuda.mem_get_info(device)
    logits = batch * config.vocab_size * 4 * 4
    if need + logits + (2 << 30) > free:
        return (f"does not fit: the KV cache needs {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free "
                f"besides the weights")
    return None


def add_speedups(rows: list[Row]) -> None:
    for key in {(r.length, r.batch) for r in rows}:
        at = [r for r in rows if (r.length, r.batch) == key and r.ms_per_token == r.ms_per_token]
        dense = [r.ms_per_token for r in at if r.kind == "dense"]
        best = min(dense) if dense else None
        for r in at:
            r.speedup_vs_best_dense = best / r.ms_per_token if best else None
            same = [x.ms_per_token for x in at if x.kind == "dense" and x.mode == r.mode]
            r.speedup_vs_best_dense_same_mode = min(same) / r.ms_per_token if same else None


def environment(command: str, device: torch.device, dtype: torch.dtype, tiny: bool, layers: int,
                bench: Bench) -> dict[str, Any]:
    from attnpatch.bench.hf_prefill import environment as prefill_env

    env = prefill_env(command, device, dtype, tiny, layers)
    env["config"] = dict(TINY if tiny else LLAMA31_8B, num_hidden_layers=layers)
    env.update(steps=bench.steps, repeats=bench.repeats, warmup=bench.warmup, compile_mode=bench.compile_mode,
               compile_backend=bench.compile_backend, fullgraph=bench.fullgraph, budget_s=bench.budget_s,
               cache_fill="Gaussian K/V through each cache layer's update() after one real token (no prefill)")
    return env


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "–" if x is None or x != x else format(x, spec)


def _kv(r: dict) -> str:
    cpu = r.get("kv_cpu_gib")
    return _fmt(r["kv_cache_gib"]) + (f" (+{cpu:.2f} CPU)" if cpu is not None else "")


def _counts(d: dict[str, int]) -> str:
    return "; ".join(f"{k} ×{v}" for k, v in d.items()) or "–"


def markdown(data: dict) -> str:
    env = data["environment"]
    lines = [f"# HF-path decode — {env['model']} — {env['gpu'] or env['device']}", "",
             f"torch {env['torch']}, CUDA {env['cuda']}, transformers {env['transformers']}, triton {env['triton']}, "
             f"{env['dtype']}, {env['date']}", "",
             f"Command: `{env['command']}`", "",
             f"Static cache filled to L with random K/V (no prefill run; methods that cannot use a static cache: a "
             f"DynamicCache, eager only); greedy decode steps with the LM head; "
             f"median over {env['repeats']} runs of {env['steps']} steps of ms per step (= per generated token "
             f"of each row of the batch; a method whose steps' cost repeats over a period, `recycled`'s stride, runs "
             f"whole periods: the row's note says how many steps), CUDA events, the garbage collector paused "
             f"during each timed run. Compiled: `torch.compile(model, backend="
             f"{env['compile_backend']!r}, mode={env['compile_mode']!r}, fullgraph={env['fullgraph']})`, "
             "compile + CUDA-graph recording in `compile s`. Generate: `model.generate` from the filled cache "
             "(transformers compiles a static cache's decode steps on CUDA), ms per token = (1 + steps tokens − 1 "
             "token) / steps; generate-deferred: the same under transformers' deferred stop check (the host runs a "
             "step ahead). Speedups over the fastest dense row of the same "
             "(L, B), over both modes and within the mode. Backends: one eager step of the patched model.", "",
             "| L | B | mode | row | ms/token | tokens/s | vs best dense | vs best dense (mode) | KV GiB | peak GiB "
             "| compile s | skipped | backends that ran | declined | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(
            f"| {r['length']} | {r['batch']} | {r['mode']} | {r['name']} | {_fmt(r['ms_per_token'], '.3f')} | "
            f"{_fmt(r['tokens_per_s'], '.0f')} | {_fmt(r['speedup_vs_best_dense'])} | "
            f"{_fmt(r['speedup_vs_best_dense_same_mode'])} | {_kv(r)} | {_fmt(r['peak_gib'])} | "
            f"{_fmt(r['compile_s'], '.1f')} | {_fmt(r['decode_skipped_fraction'], '.3f')} | "
            f"{_counts(r['backends'])} | {_counts(r['backend_declined'])} | {r['note'] or ''} |")
    profiled = [r for r in data["rows"] if r.get("top_kernels")]
    if profiled:
        lines += ["", "GPU kernel time per step (`--profile`; the rest of the step is launch gaps):", "",
                  "| L | B | mode | row | ms/step | kernels' ms/step | kernels per step |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['length']} | {r['batch']} | {r['mode']} | {r['name']} | {_fmt(r['ms_per_token'], '.3f')} | "
                  f"{_fmt(r.get('kernel_ms_per_step'), '.3f')} | {_fmt(r.get('kernels_per_step'), '.0f')} |"
                  for r in profiled]
        lines += ["", "Top GPU kernels per step (`--profile`: torch.profiler over one run of the steps):", "",
                  "| L | B | mode | row | kernel | ms/step | calls/step | share |", "|---|---|---|---|---|---|---|---|"]
        for r in profiled:
            for k in r["top_kernels"]:
                lines.append(f"| {r['length']} | {r['batch']} | {r['mode']} | {r['name']} | `{k['kernel'][:70]}` | "
                             f"{k['ms_per_step']:.3f} | {k['calls_per_step']:.1f} | {k['share']:.2f} |")
    hosted = [r for r in data["rows"] if r.get("host_functions")]
    if hosted:
        lines += ["", "Host time per eager or generate step by Python function (`--host-profile`: cProfile over one "
                  "run of the steps; its own overhead inflates the figures):", "",
                  "| L | B | mode | row | profiled ms/step | function | calls/step | own ms/step "
                  "| cumulative ms/step |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in hosted:
            for f in r["host_functions"][:12]:
                lines.append(f"| {r['length']} | {r['batch']} | {r['mode']} | {r['name']} | "
                             f"{_fmt(r.get('host_ms_per_step'), '.1f')} | "
                             f"`{f['function'][:80]}` | {f['calls_per_step']:.0f} | {f['own_ms_per_step']:.3f} | "
                             f"{f['cum_ms_per_step']:.3f} |")
    return "\n".join(lines) + "\n"


def write(data: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "hf_decode.json").write_text(json.dumps(data, indent=1, allow_nan=True))
    (out / "hf_decode.md").write_text(markdown(data))


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what} must be a comma list of integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{what} must be positive integers, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m attnpatch.bench.hf_decode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/results/hf_decode", help="output folder")
    p.add_argument("--lengths", default="32768,131072", help="tokens in the cache (comma list)")
    p.add_argument("--batches", default="1,4", help="batch sizes (comma list)")
    p.add_argument("--layers", type=int, default=32, help="decoder layers (32: Llama-3.1-8B's depth)")
    p.add_argument("--methods", default="all", help="decode methods (comma list of registered names, or 'all')")
    p.add_argument("--decode-options", nargs="+", default=None, metavar="NAME:K=V,...",
                   help="a row per setting, e.g. quest:budget=4096 blasst:a=16 (a bare name: its defaults)")
    p.add_argument("--modes", default="eager,compiled", help=f"comma list of {', '.join(MODES)}")
    p.add_argument("--baselines", default="all",
                   help=f"dense rows: 'all', 'none', or a comma list of {', '.join(BASELINE_KEYS)}")
    p.add_argument("--steps", type=int, default=16, help="decode steps per timed run")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per row (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compiled rows: 3 more)")
    p.add_argument("--page-size", type=int, default=64, help="page size of the 'triton all pages' row")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (inductor, cudagraphs, "
                   "aot_eager on CPU)")
    p.add_argument("--compile-mode", default="reduce-overhead", help="inductor mode (reduce-overhead = CUDA graphs)")
    p.add_argument("--no-fullgraph", action="store_true", help="allow graph breaks (default: fullgraph=True)")
    p.add_argument("--budget-s", type=float, default=540.0, help="start no row after this many seconds")
    p.add_argument("--profile", action="store_true",
                   help="after timing, profile each row's steps: its top GPU kernels go into the JSON and a table")
    p.add_argument("--host-profile", action="store_true",
                   help="after timing, cProfile each eager or generate row's steps (a generate row: one call, where "
                        "the host waits for every step): the Python functions taking the most host time per step go "
                        "into the JSON and a table")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"),
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--tiny", action="store_true", help="a tiny config (CPU tests), not the 8B-shaped one")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("hf_decode needs a CUDA GPU (or --device cpu --tiny)", file=sys.stderr)
        return 2
    try:
        lengths, batches = _ints(args.lengths, "--lengths"), _ints(args.batches, "--batches")
        modes = [m for m in args.modes.split(",") if m]
        if not modes or set(modes) - set(MODES):
            raise ValueError(f"--modes must be a comma list of {', '.join(MODES)}, got {args.modes!r}")
        known = registered_methods()
        methods = known if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in methods if m not in known]
        if unknown:
            raise ValueError(f"unknown decode method(s) {unknown}; registered: {', '.join(known)}")
        options = parse_decode_options(args.decode_options)
    except ValueError as e:
        p.error(str(e))
    configs = decode_configs(methods, options)
    if args.baselines != "all":
        keep = {b.strip() for b in args.baselines.split(",") if b.strip() and b.strip() != "none"}
        if keep - set(BASELINE_KEYS):
            p.error(f"--baselines takes 'all', 'none' or a comma list of {', '.join(BASELINE_KEYS)}, "
                    f"got {args.baselines!r}")
        configs = [c for c in configs if c.kind == "sparse" or c.key in keep]
    if args.compile_backend == "cudagraphs" and "compiled" in modes:
        p.error("--compile-backend cudagraphs copies every graph input that is not a lifted parameter into its "
                "graph pool at each replay: the whole KV cache and, with inlined modules, the weights (measured on "
                "the H200 at 32K, batch 4: 32.6 ms of device-to-device copies in a 46.6 ms step; at 128K, batch 4 "
                "it runs out of memory). Use inductor with --compile-mode reduce-overhead (CUDA-graph trees keep "
                "the static cache's and the weights' addresses) or --compile-backend eager")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    command = "python -m attnpatch.bench.hf_decode " + " ".join(sys.argv[1:] if argv is None else argv)
    model = build_model(args.tiny, device, dtype, layers=args.layers)
    bench = Bench(model, device, args.steps, args.repeats, args.warmup, args.compile_mode, args.compile_backend,
                  not args.no_fullgraph, args.budget_s, args.page_size, args.profile, args.host_profile,
                  max_period=max(decode_period(c.decode) for c in configs))
    data: dict[str, Any] = {"environment": environment(command, device, dtype, args.tiny, args.layers, bench),
                            "rows": []}
    rows: list[Row] = []
    for length in lengths:
        for batch in batches:
            why = fits(model.config, batch, length + bench.headroom(), dtype, device)
            shared: dict = {}
            for mode in modes:
                for cfg in configs:
                    if why is not None:
                        row = Row(cfg.name, cfg.kind, mode, length, batch, note=f"skipped: {why}")
                    else:
                        row = bench.run(cfg, mode, length, batch, shared)
                    rows.append(row)
                    add_speedups(rows)
                    data["rows"] = [asdict(r) for r in rows]
                    write(data, Path(args.out))  # results so far survive a time limit
            shared.clear()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(markdown(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
