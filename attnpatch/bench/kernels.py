"""Kernel benchmark: every prefill backend of the table (`attnpatch.backends.BACKENDS`) on the same
block selections, against SDPA (cuDNN, flash) and flash-attn-4's dense causal kernel, same run, same inputs.

Run on a GPU: `attnpatch bench kernels --out bench/results` (or `python bench/kernels.py`). Writes
`kernels.json` (GPU, versions, command, every measurement), `kernels.md` and `kernels.png`. Each
backend runs through the backend protocol (`unavailable`, `prefill_reason`, `prefill`, `dense`);
a backend that declines an input gets a row with `ms = NaN` and its reason in `note`.
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from attnpatch.backends import BACKENDS
from attnpatch.backends.base import Backend
from attnpatch.bench.selections import random_block_selection, random_page_selection
from attnpatch.methods.prefill.blasst import lambda_bound
from attnpatch.sparsity import BlockSelection, KeyBounds, SkipRule, causal_block_limit

SHAPES = {"llama3-8b": (32, 8, 128), "qwen2.5-7b": (28, 4, 128), "smollm2": (9, 3, 64),
          "gemma3-12b": (16, 8, 256), "gemma3-270m": (4, 1, 256)}  # (Hq, Hkv, D)
DEFAULT_SHAPES = ("llama3-8b", "qwen2.5-7b", "smollm2")
LENGTHS = (8192, 32768, 65536, 131072)
DENSITIES = (1.0, 0.5, 0.2, 0.1, 0.05, 0.02)
# Row labels of the table's backends (kept from earlier results: "attnpatch-triton", "flex").
LABELS = {"triton": "attnpatch-triton", "flex": "flex", "flash": "fa4"}
# Backends whose calls are also timed as a CUDA-graph replay up to 32K (flex recompiles, so not flex).
GRAPH_BACKENDS = ("triton", "flash")
DENSE_LABELS = ("sdpa-cudnn", "sdpa-flash", "flash-attn")


@dataclass
class Row:
    """One measurement."""

    kind: str  # prefill | skip | decode
    shape: str
    batch: int
    length: int
    backend: str
    density: float
    ms: float
    tflops: float | None = None
    peak_gib: float | None = None
    note: str = ""
    graph_ms: float | None = None  # CUDA-graph replay: GPU time without Python launch overhead
    table_backend: str | None = None  # the `BACKENDS` entry that ran (None: SDPA / flash-attn's own API)


def label(name: str) -> str:
    """Row label of a table backend's block-sparse prefill."""
    return LABELS.get(name, name)


def dense_label(name: str) -> str:
    """Row label of a table backend's dense causal prefill."""
    return f"{label(name)}-dense"


def is_dense_label(backend: str) -> bool:
    return backend in DENSE_LABELS or backend.endswith("-dense")


def has_prefill(name: str) -> bool:
    """Whether the table's backend `name` implements a sparse prefill path."""
    return type(BACKENDS[name]).prefill is not Backend.prefill


def has_dense(name: str) -> bool:
    """Whether the table's backend `name` implements a dense causal prefill path."""
    return type(BACKENDS[name]).dense is not Backend.dense


def default_backends() -> list[str]:
    """Every backend of the table except the reference (the exact PyTorch oracle, not a fast path)."""
    return [name for name in BACKENDS if name != "reference"]


def _is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def _sync(device) -> None:
    if _is_cuda(device):
        torch.cuda.synchronize()


def _bench(fn: Callable[[], object], rep_ms: int = 200) -> float:
    """Median milliseconds: CUDA events (triton's do_bench) when CUDA is there, else wall clock."""
    if not torch.cuda.is_available():
        fn()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))


def _bench_graph(fn: Callable[[], object]) -> float:
    """Median milliseconds of a CUDA-graph replay of `fn` (launch overhead removed, as in serving)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return _bench(graph.replay)


def _graph_ms(fn: Callable[[], object], length: int, device="cuda", up_to: int = 32768) -> float | None:
    """`_bench_graph` for short runs, where eager timings can be bound by the host's launch
    overhead; None for long runs (GPU-bound anyway), off CUDA, or when `fn` cannot be captured."""
    if length > up_to or not _is_cuda(device):
        return None
    try:
        return _bench_graph(fn)
    except Exception:  # noqa: BLE001  (a backend that syncs with the host cannot be captured)
        torch.cuda.synchronize()
        return None


def _peak_gib(fn: Callable[[], object], device="cuda") -> float | None:
    """Peak GPU memory of one call, inputs (and the selection) included; None off CUDA."""
    if not _is_cuda(device):
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def _sdpa(backend_name: str, q, k, v, repeat: bool):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend_name]
    if repeat:
        g = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)

    def run():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=not repeat)

    return run


def _dense_runner(name: str, q, k, v):
    """SDPA backend `name`, natively GQA if it accepts it, else with K/V repeated outside the timing."""
    for repeat in (False, True):
        run = _sdpa(name, q, k, v, repeat)
        try:
            run()
            _sync(q.device)
            return run, ("" if not repeat else "K/V repeated for GQA outside the timing")
        except RuntimeError:
            continue
    return None, f"{name} unavailable"


def _flash_attn_runner(q, k, v):
    """flash-attn's own (FA2/FA3 API) kernel (causal, native GQA), when that package is installed."""
    try:
        from flash_attn import flash_attn_func
    except Exception:  # noqa: BLE001  (missing, or flash-attn-4 alone without the FA2 API)
        return None
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # [B, L, H, D], outside the timing
    return lambda: flash_attn_func(qt, kt, vt, causal=True)


def table_prefill_runner(name: str, q, k, v, sel: BlockSelection, bounds: KeyBounds | None = None):
    """`(fn, None)` calling `BACKENDS[name].prefill` on these inputs, or `(None, why it declines)`."""
    backend = BACKENDS[name]
    bounds = KeyBounds() if bounds is None else bounds
    why = backend.unavailable(q.device) or backend.prefill_reason(q, k, v, sel, bounds)
    if why is not None:
        return None, why
    scale = q.shape[-1] ** -0.5
    return (lambda: backend.prefill(q, k, v, sel, scale=scale, bounds=bounds)), None


def table_dense_runner(name: str, q, k, v, bounds: KeyBounds | None = None):
    """`(fn, None)` calling `BACKENDS[name].dense` (causal), or `(None, why it declines)`."""
    backend = BACKENDS[name]
    bounds = KeyBounds() if bounds is None else bounds
    why = backend.unavailable(q.device) or backend.dense_reason(q, k, v, bounds)
    if why is not None:
        return None, why
    scale = q.shape[-1] ** -0.5
    return (lambda: backend.dense(q, k, v, scale=scale, bounds=bounds)), None


def causal_flops(batch: int, heads: int, length: int, d: int, block: int, kept_blocks: float | None = None) -> float:
    """Forward FLOPs (QKᵀ + PV) over kept block pairs; dense causal when `kept_blocks` is None."""
    if kept_blocks is None:
        return 4.0 * batch * heads * d * length * (length + 1) / 2
    return 4.0 * d * kept_blocks * block * block


def _time_row(run: Callable[[], object], row: Row, flops: float, length: int, device, graph: bool) -> Row:
    """Fill `row` with the timing, throughput, peak memory (from 64K) and graph replay time of `run`."""
    row.ms = _bench(run)
    row.tflops = flops / row.ms / 1e9
    row.peak_gib = _peak_gib(run, device) if length >= 65536 else None
    row.graph_ms = _graph_ms(run, length, device) if graph else None
    return row


def _failed(row: Row, e: Exception, device) -> Row:
    with contextlib.suppress(Exception):
        _sync(device)
    row.ms, row.note = float("nan"), f"{type(e).__name__}: {str(e)[:160]}"
    return row


def bench_prefill(shapes=("llama3-8b", "qwen2.5-7b", "smollm2"), lengths=LENGTHS, densities=DENSITIES,
                  batches=(1, 4), block: int = 128, max_batch_tokens: int = 131072, log=print,
                  rows: list[Row] | None = None, checkpoint: Callable[[], None] | None = None,
                  backends: Sequence[str] | None = None, device="cuda",
                  dtype: torch.dtype = torch.bfloat16) -> list[Row]:
    """Dense rows (SDPA cuDNN / flash, flash-attn, each table backend's dense path) and, per density,
    every table backend in `backends` (default `default_backends()`) on the same block selection."""
    rows = [] if rows is None else rows
    names = default_backends() if backends is None else list(backends)
    dev = torch.device(device)
    for shape in shapes:
        hq, hkv, d = SHAPES[shape]
        for length in lengths:
            for batch in batches:
                if batch * length > max_batch_tokens:
                    continue
                torch._dynamo.reset()  # flex recompiles per shape: start each configuration with a fresh cache
                g = torch.Generator(device=dev).manual_seed(length + batch)
                q = torch.randn(batch, hq, length, d, device=dev, dtype=dtype, generator=g)
                k = torch.randn(batch, hkv, length, d, device=dev, dtype=dtype, generator=g)
                v = torch.randn(batch, hkv, length, d, device=dev, dtype=dtype, generator=g)
                dense_flops = causal_flops(batch, hq, length, d, block)
                tag = f"{shape} B={batch} L={length}"

                def new_row(backend: str, density: float, table: str | None = None,
                            shape=shape, batch=batch, length=length) -> Row:
                    return Row("prefill", shape, batch, length, backend, density, float("nan"), table_backend=table)

                for name in ("cudnn", "flash"):
                    run, note = _dense_runner(name, q, k, v)
                    row = new_row(f"sdpa-{name}", 1.0)
                    row.note = note
                    if run is not None:
                        _time_row(run, row, dense_flops, length, dev, graph=True)
                        log(f"{tag} sdpa-{name}: {row.ms:.3f} ms")
                    rows.append(row)
                fa = _flash_attn_runner(q, k, v) if _is_cuda(dev) else None
                if fa is not None:
                    row = new_row("flash-attn", 1.0)
                    try:
                        _time_row(fa, row, dense_flops, length, dev, graph=False)
                        log(f"{tag} flash-attn: {row.ms:.3f} ms")
                    except Exception as e:  # noqa: BLE001
                        _failed(row, e, dev)
                    rows.append(row)
                available = {}
                for name in names:
                    available[name] = BACKENDS[name].unavailable(dev)
                    if available[name] is not None or not has_dense(name):
                        continue
                    row = new_row(dense_label(name), 1.0, name)
                    run, why = table_dense_runner(name, q, k, v)
                    if run is None:
                        row.note = f"declined: {why}"
                    else:
                        try:
                            _time_row(run, row, dense_flops, length, dev, graph=name in GRAPH_BACKENDS)
                            log(f"{tag} {row.backend}: {row.ms:.3f} ms")
                        except Exception as e:  # noqa: BLE001  (a failing backend is a result, not a crash)
                            _failed(row, e, dev)
                    rows.append(row)
                for name in names:  # unavailable at all: one row per configuration says why
                    if available[name] is not None:
                        rows.append(new_row(label(name), float("nan"), name))
                        rows[-1].note = f"unavailable: {available[name]}"
                for density in densities:
                    if density >= 1.0:  # every causal block: a stride-0 list, as a method hands it over
                        sel = BlockSelection.causal(batch, hq, length, length, block, block, dev)
                    else:
                        sel = random_block_selection(batch, hq, length, block, density, seed=7, device=dev)
                    kept = float(sel.counts.sum())
                    actual = kept / (float(causal_block_limit(length, length, block, block).sum()) * batch * hq)
                    flops = causal_flops(batch, hq, length, d, block, kept)
                    for name in names:
                        if available[name] is not None:
                            continue
                        row = new_row(label(name), actual, name)
                        run, why = table_prefill_runner(name, q, k, v, sel)
                        if run is None:
                            row.note = f"declined: {why}"
                            log(f"{tag} {row.backend} d={actual:.3f}: declined ({why})")
                        else:
                            try:
                                run()
                                _time_row(run, row, flops, length, dev, graph=name in GRAPH_BACKENDS)
                                log(f"{tag} {row.backend} d={actual:.3f}: {row.ms:.3f} ms")
                            except Exception as e:  # noqa: BLE001  (a failing backend is a result, not a crash)
                                _failed(row, e, dev)
                                log(f"{tag} {row.backend}: FAILED {e}")
                        rows.append(row)
                    del sel
                del q, k, v
                if _is_cuda(dev):
                    torch.cuda.empty_cache()
                if checkpoint is not None:
                    checkpoint()
    return rows


def skip_qkv(batch: int, hq: int, hkv: int, length: int, d: int, sink: float, block: int = 128, seed: int = 0,
             device="cuda", dtype: torch.dtype = torch.bfloat16):
    """Q/K/V where each key block carries a random share c ~ U(0, sink) of a direction that every
    query follows, and block 0 carries all of it (an attention sink): a tile is negligible when its
    c is far enough below the sink's, so λ sets the skipped fraction."""
    g = torch.Generator(device=device).manual_seed(seed)
    u = F.normalize(torch.randn(d, device=device, generator=g), dim=0)
    q = 0.3 * torch.randn(batch, hq, length, d, device=device, generator=g) + 3 * u
    c = torch.rand(length // block + 1, device=device, generator=g) * sink
    c[0] = sink
    k = torch.randn(batch, hkv, length, d, device=device, generator=g) + c.repeat_interleave(block)[:length, None] * u
    v = torch.randn(batch, hkv, length, d, device=device, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def bench_skip(shape: str = "llama3-8b", length: int = 32768, block: int = 128, log=print) -> list[Row]:
    """Skip mode of the Triton backend (the table's one backend with skip rules): overhead at zero
    skipped tiles, and speedup at increasing skipped fractions (λ on scaled scores)."""
    triton_backend = BACKENDS["triton"]
    hq, hkv, d = SHAPES[shape]
    rows = []
    q, k, v = skip_qkv(1, hq, hkv, length, d, sink=24.0, block=block)
    scale, bounds = d ** -0.5, KeyBounds()
    sel = BlockSelection.causal(1, hq, length, length, block, block, "cuda")
    plain = _bench(lambda: triton_backend.prefill(q, k, v, sel, scale=scale, bounds=bounds))
    rows.append(Row("skip", shape, 1, length, "plain", 1.0, plain, note="no skip mode", table_backend="triton"))
    log(f"skip plain: {plain:.3f} ms")
    for lam in (0.0, 1e-3, 1e-2, 0.05, 0.1, 0.2, 0.4):
        rule = SkipRule(lambda_bound(lam, scale, "scaled"))
        ssel = BlockSelection.causal(1, hq, length, length, block, block, "cuda", rule)
        why = triton_backend.prefill_reason(q, k, v, ssel, bounds)
        if why is not None:
            rows.append(Row("skip", shape, 1, length, f"skip λ={lam:g}", 1.0, float("nan"),
                            note=f"declined: {why}", table_backend="triton"))
            continue
        tiles = torch.zeros(2, dtype=torch.int64, device="cuda")
        triton_backend.prefill(q, k, v, ssel, scale=scale, bounds=bounds, tile_counts=tiles)
        visited, skipped = (float(x) for x in tiles.tolist())
        frac = skipped / max(visited, 1.0)
        ms = _bench(lambda ssel=ssel: triton_backend.prefill(q, k, v, ssel, scale=scale, bounds=bounds))
        rows.append(Row("skip", shape, 1, length, f"skip λ={lam:g}", 1.0 - frac, ms,
                        note=f"skipped {frac:.3f}; speedup vs plain {plain / ms:.2f}x", table_backend="triton"))
        log(f"skip λ={lam:g}: skipped {frac:.3f}, {ms:.3f} ms vs plain {plain:.3f} ({plain / ms:.2f}x)")
    return rows


def bench_decode(shape: str = "llama3-8b", lengths=(32768, 131072), batches=(1, 4), page: int = 64,
                 fractions=(1.0, 1 / 16), log=print) -> list[Row]:
    """Decode: the Triton split-KV kernel over a page selection vs dense SDPA decode."""
    try:
        from attnpatch.backends.triton.decode import sparse_decode_attention
    except ImportError:
        return []
    hq, hkv, d = SHAPES[shape]
    rows = []
    for length in lengths:
        for batch in batches:
            g = torch.Generator(device="cuda").manual_seed(length)
            q = torch.randn(batch, hq, 1, d, device="cuda", dtype=torch.bfloat16, generator=g)
            k = torch.randn(batch, hkv, length, d, device="cuda", dtype=torch.bfloat16, generator=g)
            v = torch.randn(batch, hkv, length, d, device="cuda", dtype=torch.bfloat16, generator=g)

            def dense_fn(q=q, k=k, v=v):
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

            dense, dense_g = _bench(dense_fn), _bench_graph(dense_fn)
            rows.append(Row("decode", shape, batch, length, "sdpa", 1.0, dense, note=f"graph replay {dense_g:.4f} ms"))
            log(f"decode B={batch} L={length} sdpa: {dense:.4f} ms (graph {dense_g:.4f})")
            for frac in fractions:
                sel = random_page_selection(batch, hkv, length, page, frac, device="cuda")

                def sparse_fn(q=q, k=k, v=v, sel=sel):
                    return sparse_decode_attention(q, k, v, sel)

                try:
                    ms, ms_g = _bench(sparse_fn), _bench_graph(sparse_fn)
                    note = (f"graph replay {ms_g:.4f} ms; speedup vs sdpa {dense / ms:.2f}x eager, "
                            f"{dense_g / ms_g:.2f}x graph")
                except Exception as e:  # noqa: BLE001
                    ms, note = float("nan"), f"{type(e).__name__}: {str(e)[:160]}"
                rows.append(Row("decode", shape, batch, length, "attnpatch-triton", frac, ms, note=note,
                                table_backend="triton"))
                log(f"decode B={batch} L={length} frac={frac:.4f}: {ms:.4f} ms ({note})")
    return rows


def environment(command: str, backends: Sequence[str] | None = None) -> dict:
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    names = default_backends() if backends is None else list(backends)
    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "transformers": transformers.__version__,
        "flash_attn": flash_attn_version(),
        "python": platform.python_version(),
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "dtype": "bfloat16",
        "block": 128,
        "block_sparse_variant": {d: _bs_variant(d) for d in (64, 128)},
        "backends": {name: BACKENDS[name].unavailable(device) or "available" for name in names},
    }


def _package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def flash_attn_version() -> str | None:
    """The installed flash-attn distribution (flash-attn-4 / CuTe, else FA2/FA3) as "name version"."""
    for name in ("flash-attn-4", "flash-attn-cute", "flash-attn"):
        found = _package_version(name)
        if found is not None:
            return f"{name} {found}"
    return None


def _bs_variant(head_dim: int) -> int | None:
    """The block-sparse kernel's main-loop variant on this GPU for a head dim."""
    if not torch.cuda.is_available():
        return None
    from attnpatch.backends.triton.block_sparse import default_variant

    return default_variant(torch.device("cuda"), head_dim)


def _k(length: int) -> str:
    return f"{length // 1024}K" if length >= 1024 else str(length)


def _fmt(x: float | None) -> str:
    return "–" if x is None or x != x else f"{x:.3f}"


def prefill_table(rows: list[dict]) -> str:
    """Markdown: per (shape, batch, length), each backend's ms at each density, the dense rows and the
    cuDNN target; `graph` columns: CUDA-graph replay (GPU time only; measured up to 32K, where eager
    calls can be bound by Python launch overhead). Declined backends show "–" (reasons below)."""
    pre = [r for r in rows if r["kind"] == "prefill"]
    timed = [r for r in pre if r["density"] == r["density"]]  # NaN density: a backend unavailable
    dense = [b for b in dict.fromkeys(r["backend"] for r in timed if is_dense_label(r["backend"]))
             if b != "sdpa-cudnn"]
    sparse = list(dict.fromkeys(r["backend"] for r in timed if not is_dense_label(r["backend"])))
    graphed = [b for b in sparse if any(r.get("graph_ms") is not None for r in timed if r["backend"] == b)]
    head = (["shape", "B", "L", "density", "cuDNN ms", "target ms"] + [f"{b} ms" for b in dense]
            + [f"{b} ms" for b in sparse] + ["triton / cuDNN", "met", "cuDNN graph"] + [f"{b} graph" for b in graphed])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = sorted({(r["shape"], r["batch"], r["length"]) for r in timed})
    for shape, batch, length in keys:
        sub = [r for r in timed if (r["shape"], r["batch"], r["length"]) == (shape, batch, length)]

        def first(backend: str, density: float | None = None, sub=sub) -> dict | None:
            return next((r for r in sub if r["backend"] == backend and (density is None or r["density"] == density)),
                        None)

        cudnn_row = first("sdpa-cudnn")
        cudnn = cudnn_row["ms"] if cudnn_row else math.nan
        dense_ms = [_fmt((first(b) or {}).get("ms")) for b in dense]
        for dn in sorted({r["density"] for r in sub if r["backend"] in sparse}, reverse=True):
            cells = {b: first(b, dn) for b in sparse}
            tri = (cells.get("attnpatch-triton") or {}).get("ms", math.nan)
            target = dn * cudnn / 0.8 * (1.0 if dn >= 0.999 else 1.05)
            met = "yes" if tri <= target else "no"
            line = ([shape, str(batch), _k(length), f"{dn:.3f}", _fmt(cudnn), _fmt(target)] + dense_ms
                    + [_fmt((cells[b] or {}).get("ms")) for b in sparse]
                    + [_fmt(tri / cudnn), met, _fmt(cudnn_row and cudnn_row.get("graph_ms"))]
                    + [_fmt((cells[b] or {}).get("graph_ms")) for b in graphed])
            lines.append("| " + " | ".join(line) + " |")
    declined: dict[tuple[str, str], int] = {}
    for r in pre:
        if r["ms"] != r["ms"] and r["note"]:
            declined[(r["backend"], r["note"])] = declined.get((r["backend"], r["note"]), 0) + 1
    if declined:
        lines += ["", "Not measured (backend: reason, rows):", ""]
        lines += [f"* {b}: {note} ({n})" for (b, note), n in declined.items()]
    return "\n".join(lines)


def write_results(rows: list[Row], env: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {"environment": env, "rows": [asdict(r) for r in rows]}
    (out_dir / "kernels.json").write_text(json.dumps(data, indent=1, allow_nan=True))
    other = [r for r in data["rows"] if r["kind"] != "prefill"]
    md = [f"# Kernel benchmark — {env['gpu']}", "", f"torch {env['torch']}, triton {env['triton']}, CUDA "
          f"{env['cuda']}, flash-attn {env.get('flash_attn')}, bf16, block 128, {env['date']}", "",
          f"Command: `{env['command']}`", "",
          "Backends: " + ", ".join(f"{k} ({v})" for k, v in env.get("backends", {}).items()), "",
          "Target: attnpatch-triton ≤ density × cuDNN / 0.8 (+5% below density 1).", "",
          prefill_table(data["rows"]), ""]
    if other:
        md += ["| kind | shape | B | L | backend | density / kept | ms | note |", "|---|---|---|---|---|---|---|---|"]
        md += [f"| {r['kind']} | {r['shape']} | {r['batch']} | {_k(r['length'])} | {r['backend']} | "
               f"{r['density']:.4f} | {r['ms']:.4f} | {r['note']} |" for r in other]
    (out_dir / "kernels.md").write_text("\n".join(md) + "\n")
    with contextlib.suppress(ImportError):  # matplotlib missing: JSON and markdown only
        plot(data["rows"], out_dir / "kernels.png")


def plot(rows: list[dict], path: Path) -> None:
    """Time vs density per sparse backend, one panel per (shape, L) at B=1, dense rows as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pre = [r for r in rows if r["kind"] == "prefill" and r["batch"] == 1 and r["ms"] == r["ms"]]
    keys = sorted({(r["shape"], r["length"]) for r in pre})
    if not keys:
        return
    sparse = list(dict.fromkeys(r["backend"] for r in pre if not is_dense_label(r["backend"])))
    dense = list(dict.fromkeys(r["backend"] for r in pre if is_dense_label(r["backend"])))
    styles = ("o-", "s--", "^-.", "D:", "v-")
    colors = {"sdpa-cudnn": "k", "sdpa-flash": "gray"}
    cols = 4
    nrow = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrow, cols, figsize=(4 * cols, 3.2 * nrow), squeeze=False)
    for ax, (shape, length) in zip(axes.flat, keys, strict=False):
        sub = [r for r in pre if (r["shape"], r["length"]) == (shape, length)]
        for i, backend in enumerate(sparse):
            pts = sorted((r["density"], r["ms"]) for r in sub if r["backend"] == backend)
            if pts:
                ax.plot(*zip(*pts, strict=True), styles[i % len(styles)], label=backend)
        for i, backend in enumerate(dense):
            ms = next((r["ms"] for r in sub if r["backend"] == backend), None)
            if ms is not None:
                ax.axhline(ms, color=colors.get(backend, f"C{len(sparse) + i}"), lw=1, ls=":", label=backend)
                if backend == "sdpa-cudnn":
                    xs = [0.02, 1.0]
                    ax.plot(xs, [x * ms / 0.8 for x in xs], color="tab:green", lw=1, label="target")
        ax.set(xscale="log", yscale="log", title=f"{shape} L={_k(length)}", xlabel="density", ylabel="ms")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _backend_list(text: str) -> list[str]:
    import argparse

    names = [x for x in text.split(",") if x]
    unknown = [x for x in names if x not in BACKENDS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown backend(s) {unknown}; the table has {', '.join(BACKENDS)}")
    return names


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="attnpatch bench kernels", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="bench/results", help="output folder")
    p.add_argument("--shapes", default=",".join(DEFAULT_SHAPES),
                   help=f"attention shapes, comma separated; of {', '.join(SHAPES)}")
    p.add_argument("--lengths", default=",".join(str(x) for x in LENGTHS), help="sequence lengths, comma separated")
    p.add_argument("--densities", default=",".join(str(x) for x in DENSITIES),
                   help="block densities of the random selections, comma separated")
    p.add_argument("--batches", default="1,4", help="batch sizes, comma separated")
    p.add_argument("--max-batch-tokens", type=int, default=131072, help="skip B·L above this")
    p.add_argument("--parts", default="prefill,skip,decode", help="what to measure, comma separated; of prefill, "
                   "skip (BLASST's skip rule), decode")
    p.add_argument("--decode-shapes", default="llama3-8b",
                   help=f"shapes of the skip and decode parts, comma separated; of {', '.join(SHAPES)}")
    p.add_argument("--decode-lengths", default="32768,131072", help="lengths of the decode part, comma separated")
    p.add_argument("--backends", type=_backend_list, default=default_backends(),
                   help=f"table backends timed in prefill (comma list of {', '.join(BACKENDS)}; "
                        "the reference is slow at long context)")
    args = p.parse_args(argv)
    shapes, decode_shapes = args.shapes.split(","), args.decode_shapes.split(",")
    unknown = [s for s in (*shapes, *decode_shapes) if s not in SHAPES]
    if unknown:
        p.error(f"unknown shape(s) {', '.join(unknown)}; allowed: {', '.join(SHAPES)}")
    if not torch.cuda.is_available():
        print("attnpatch bench kernels needs a CUDA GPU", file=sys.stderr)
        return 2
    command = "attnpatch bench kernels " + " ".join(argv if argv is not None else sys.argv[1:])
    parts = args.parts.split(",")
    rows: list[Row] = []
    env = environment(command, args.backends)

    def checkpoint():  # results so far survive a time limit
        write_results(rows, env, Path(args.out))

    if "prefill" in parts:
        bench_prefill(shapes, [int(x) for x in args.lengths.split(",")],
                      [float(x) for x in args.densities.split(",")], [int(x) for x in args.batches.split(",")],
                      max_batch_tokens=args.max_batch_tokens, rows=rows, checkpoint=checkpoint,
                      backends=args.backends)
    decode_lengths = [int(x) for x in args.decode_lengths.split(",")]
    for shape in decode_shapes:
        if "skip" in parts:
            rows += bench_skip(shape)
        if "decode" in parts:
            rows += bench_decode(shape, lengths=decode_lengths)
        checkpoint()
    write_results(rows, env, Path(args.out))
    print((Path(args.out) / "kernels.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
