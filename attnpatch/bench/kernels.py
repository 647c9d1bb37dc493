"""Kernel benchmark: attnpatch's executors against SDPA (cuDNN, flash) and FlexAttention, same run, same inputs.

Run on a GPU: `attnpatch bench kernels --out bench/results` (or `python bench/kernels.py`). Writes
`kernels.json` (GPU, versions, command, every measurement), `kernels.md` and `kernels.png`.
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from attnpatch.bench.selections import random_block_selection, random_page_selection
from attnpatch.sparsity import BlockSelection, causal_block_limit

SHAPES = {"llama3-8b": (32, 8, 128), "qwen2.5-7b": (28, 4, 128), "smollm2": (9, 3, 64)}
LENGTHS = (8192, 32768, 65536, 131072)
DENSITIES = (1.0, 0.5, 0.2, 0.1, 0.05, 0.02)


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


def _bench(fn: Callable[[], object], rep_ms: int = 200) -> float:
    """Median milliseconds with CUDA events (triton's do_bench)."""
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


def _graph_ms(fn: Callable[[], object], length: int, up_to: int = 32768) -> float | None:
    """`_bench_graph` for short runs, where eager timings can be bound by the host's launch
    overhead; None for long runs (GPU-bound anyway) or when `fn` cannot be captured."""
    if length > up_to:
        return None
    try:
        return _bench_graph(fn)
    except Exception:  # noqa: BLE001  (a backend that syncs with the host cannot be captured)
        torch.cuda.synchronize()
        return None


def _peak_gib(fn: Callable[[], object]) -> float:
    """Peak GPU memory of one call, inputs (and the selection) included."""
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
            torch.cuda.synchronize()
            return run, ("" if not repeat else "K/V repeated for GQA outside the timing")
        except RuntimeError:
            continue
    return None, f"{name} unavailable"


def _flash_attn_runner(q, k, v):
    """flash-attn's own kernel (causal, native GQA), when the package is installed."""
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return None
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # [B, L, H, D], outside the timing
    return lambda: flash_attn_func(qt, kt, vt, causal=True)


def _sparse_runners(q, k, v, sel: BlockSelection) -> dict[str, Callable[[], object]]:
    runners = {}
    try:
        from attnpatch.backends.triton.block_sparse import block_sparse_attention_triton

        runners["attnpatch-triton"] = lambda: block_sparse_attention_triton(q, k, v, sel)
    except ImportError:
        pass
    try:
        from attnpatch.backends.flex import flex_block_sparse_attention

        runners["flex"] = lambda: flex_block_sparse_attention(q, k, v, sel)
    except ImportError:
        pass
    return runners


def causal_flops(batch: int, heads: int, length: int, d: int, block: int, kept_blocks: float | None = None) -> float:
    """Forward FLOPs (QKᵀ + PV) over kept block pairs; dense causal when `kept_blocks` is None."""
    if kept_blocks is None:
        return 4.0 * batch * heads * d * length * (length + 1) / 2
    return 4.0 * d * kept_blocks * block * block


def bench_prefill(shapes=("llama3-8b", "qwen2.5-7b", "smollm2"), lengths=LENGTHS, densities=DENSITIES,
                  batches=(1, 4), block: int = 128, max_batch_tokens: int = 131072, log=print,
                  rows: list[Row] | None = None, checkpoint: Callable[[], None] | None = None) -> list[Row]:
    rows = [] if rows is None else rows
    dev = "cuda"
    for shape in shapes:
        hq, hkv, d = SHAPES[shape]
        for length in lengths:
            for batch in batches:
                if batch * length > max_batch_tokens:
                    continue
                torch._dynamo.reset()  # flex recompiles per shape: start each configuration with a fresh cache
                g = torch.Generator(device=dev).manual_seed(length + batch)
                q = torch.randn(batch, hq, length, d, device=dev, dtype=torch.bfloat16, generator=g)
                k = torch.randn(batch, hkv, length, d, device=dev, dtype=torch.bfloat16, generator=g)
                v = torch.randn(batch, hkv, length, d, device=dev, dtype=torch.bfloat16, generator=g)
                dense_flops = causal_flops(batch, hq, length, d, block)
                for name in ("cudnn", "flash"):
                    run, note = _dense_runner(name, q, k, v)
                    if run is None:
                        rows.append(Row("prefill", shape, batch, length, f"sdpa-{name}", 1.0, float("nan"), note=note))
                        continue
                    ms = _bench(run)
                    peak = _peak_gib(run) if length >= 65536 else None
                    rows.append(Row("prefill", shape, batch, length, f"sdpa-{name}", 1.0, ms,
                                    dense_flops / ms / 1e9, peak, note, _graph_ms(run, length)))
                    log(f"{shape} B={batch} L={length} sdpa-{name}: {ms:.3f} ms")
                fa = _flash_attn_runner(q, k, v)
                if fa is not None:
                    ms = _bench(fa)
                    rows.append(Row("prefill", shape, batch, length, "flash-attn", 1.0, ms, dense_flops / ms / 1e9))
                    log(f"{shape} B={batch} L={length} flash-attn: {ms:.3f} ms")
                for density in densities:
                    if density >= 1.0:  # every causal block: a stride-0 list, as a method hands it over
                        sel = BlockSelection.causal(batch, hq, length, length, block, block, dev)
                    else:
                        sel = random_block_selection(batch, hq, length, block, density, seed=7, device=dev)
                    kept = float(sel.counts.sum())
                    actual = kept / (float(causal_block_limit(length, length, block, block).sum()) * batch * hq)
                    flops = causal_flops(batch, hq, length, d, block, kept)
                    for name, run in _sparse_runners(q, k, v, sel).items():
                        try:
                            run()
                            ms = _bench(run)
                            peak = _peak_gib(run) if length >= 65536 else None
                            rows.append(Row("prefill", shape, batch, length, name, actual, ms, flops / ms / 1e9, peak,
                                            graph_ms=_graph_ms(run, length) if name == "attnpatch-triton" else None))
                            log(f"{shape} B={batch} L={length} {name} d={actual:.3f}: {ms:.3f} ms")
                        except Exception as e:  # noqa: BLE001  (a failing backend is a result, not a crash)
                            rows.append(Row("prefill", shape, batch, length, name, actual, float("nan"),
                                            note=f"{type(e).__name__}: {str(e)[:160]}"))
                            log(f"{shape} B={batch} L={length} {name}: FAILED {e}")
                    del sel
                del q, k, v
                torch.cuda.empty_cache()
                if checkpoint is not None:
                    checkpoint()
    return rows


def skip_qkv(batch: int, hq: int, hkv: int, length: int, d: int, sink: float, block: int = 128, seed: int = 0):
    """Q/K/V where each key block carries a random share c ~ U(0, sink) of a direction that every
    query follows, and block 0 carries all of it (an attention sink): a tile is negligible when its
    c is far enough below the sink's, so λ sets the skipped fraction."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    u = F.normalize(torch.randn(d, device="cuda", generator=g), dim=0)
    q = 0.3 * torch.randn(batch, hq, length, d, device="cuda", generator=g) + 3 * u
    c = torch.rand(length // block + 1, device="cuda", generator=g) * sink
    c[0] = sink
    k = torch.randn(batch, hkv, length, d, device="cuda", generator=g) + c.repeat_interleave(block)[:length, None] * u
    v = torch.randn(batch, hkv, length, d, device="cuda", generator=g)
    return q.bfloat16(), k.bfloat16(), v.bfloat16()


def bench_skip(shape: str = "llama3-8b", length: int = 32768, block: int = 128, log=print) -> list[Row]:
    """Skip mode: overhead at zero skipped tiles, and speedup at increasing skipped fractions."""
    from attnpatch.backends.triton.block_sparse import block_sparse_attention_triton

    hq, hkv, d = SHAPES[shape]
    rows = []
    q, k, v = skip_qkv(1, hq, hkv, length, d, sink=24.0, block=block)
    sel = BlockSelection.causal(1, hq, length, length, block, block, "cuda")
    plain = _bench(lambda: block_sparse_attention_triton(q, k, v, sel))
    rows.append(Row("skip", shape, 1, length, "plain", 1.0, plain, note="no skip mode"))
    log(f"skip plain: {plain:.3f} ms")
    for lam in (0.0, 1e-3, 1e-2, 0.05, 0.1, 0.2, 0.4):
        _, (visited, skipped) = block_sparse_attention_triton(q, k, v, sel, skip_threshold=lam,
                                                              skip_convention="scaled", count_tiles=True)
        frac = float(skipped) / max(float(visited), 1.0)
        ms = _bench(lambda lam=lam: block_sparse_attention_triton(q, k, v, sel, skip_threshold=lam,
                                                                  skip_convention="scaled"))
        rows.append(Row("skip", shape, 1, length, f"skip λ={lam:g}", 1.0 - frac, ms,
                        note=f"skipped {frac:.3f}; speedup vs plain {plain / ms:.2f}x"))
        log(f"skip λ={lam:g}: skipped {frac:.3f}, {ms:.3f} ms vs plain {plain:.3f} ({plain / ms:.2f}x)")
    return rows


def bench_decode(shape: str = "llama3-8b", lengths=(32768, 131072), batches=(1, 4), page: int = 64,
                 fractions=(1.0, 1 / 16), log=print) -> list[Row]:
    """Decode: sparse split-KV kernel over a page selection vs dense SDPA decode."""
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
                rows.append(Row("decode", shape, batch, length, "attnpatch-triton", frac, ms, note=note))
                log(f"decode B={batch} L={length} frac={frac:.4f}: {ms:.4f} ms ({note})")
    return rows


def environment(command: str) -> dict:
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "dtype": "bfloat16",
        "block": 128,
        "block_sparse_variant": {d: _bs_variant(d) for d in (64, 128)},
    }


def _bs_variant(head_dim: int) -> int | None:
    """The block-sparse kernel's main-loop variant on this GPU for a head dim."""
    from attnpatch.backends.triton.block_sparse import default_variant

    return default_variant(torch.device("cuda"), head_dim) if torch.cuda.is_available() else None


def prefill_table(rows: list[dict]) -> str:
    """Markdown: per (shape, batch, length), each backend's ms at each density, with the cuDNN target;
    `graph` columns: CUDA-graph replay (GPU time only; measured up to 32K, where eager calls can be
    bound by Python launch overhead)."""
    lines = ["| shape | B | L | density | cuDNN ms | target ms | attnpatch-triton ms | flex ms | triton / cuDNN | met "
             "| cuDNN graph | triton graph |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["shape"], r["batch"], r["length"]) for r in rows if r["kind"] == "prefill"},
                  key=lambda x: (x[0], x[1], x[2]))

    def fmt(x: float | None) -> str:
        return "–" if x is None else f"{x:.3f}"

    for shape, batch, length in keys:
        sub = [r for r in rows if r["kind"] == "prefill" and (r["shape"], r["batch"], r["length"]) == (shape, batch, length)]
        dense = next((r for r in sub if r["backend"] == "sdpa-cudnn"), None)
        cudnn = dense["ms"] if dense else math.nan
        dens = sorted({r["density"] for r in sub if r["backend"] in ("attnpatch-triton", "flex")}, reverse=True)
        for dn in dens:
            tri_row = next((r for r in sub if r["backend"] == "attnpatch-triton" and r["density"] == dn), None)
            tri = tri_row["ms"] if tri_row else math.nan
            flex = next((r["ms"] for r in sub if r["backend"] == "flex" and r["density"] == dn), math.nan)
            target = dn * cudnn / 0.8 * (1.0 if dn >= 0.999 else 1.05)
            met = "yes" if tri <= target else "no"
            lines.append(f"| {shape} | {batch} | {length // 1024}K | {dn:.3f} | {cudnn:.3f} | {target:.3f} | "
                         f"{tri:.3f} | {flex:.3f} | {tri / cudnn:.3f} | {met} | "
                         f"{fmt(dense and dense.get('graph_ms'))} | {fmt(tri_row and tri_row.get('graph_ms'))} |")
    return "\n".join(lines)


def write_results(rows: list[Row], env: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {"environment": env, "rows": [asdict(r) for r in rows]}
    (out_dir / "kernels.json").write_text(json.dumps(data, indent=1, allow_nan=True))
    other = [r for r in data["rows"] if r["kind"] != "prefill"]
    md = [f"# Kernel benchmark — {env['gpu']}", "", f"torch {env['torch']}, triton {env['triton']}, CUDA "
          f"{env['cuda']}, bf16, block 128, {env['date']}", "", f"Command: `{env['command']}`", "",
          "Target: attnpatch-triton ≤ density × cuDNN / 0.8 (+5% below density 1).", "",
          prefill_table(data["rows"]), ""]
    if other:
        md += ["| kind | shape | B | L | backend | density / kept | ms | note |", "|---|---|---|---|---|---|---|---|"]
        md += [f"| {r['kind']} | {r['shape']} | {r['batch']} | {r['length'] // 1024}K | {r['backend']} | "
               f"{r['density']:.4f} | {r['ms']:.4f} | {r['note']} |" for r in other]
    (out_dir / "kernels.md").write_text("\n".join(md) + "\n")
    with contextlib.suppress(ImportError):  # matplotlib missing: JSON and markdown only
        plot(data["rows"], out_dir / "kernels.png")


def plot(rows: list[dict], path: Path) -> None:
    """Time vs density per backend, one panel per (shape, L) at B=1, cuDNN as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["shape"], r["length"]) for r in rows if r["kind"] == "prefill" and r["batch"] == 1})
    if not keys:
        return
    cols = 4
    nrow = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrow, cols, figsize=(4 * cols, 3.2 * nrow), squeeze=False)
    for ax, (shape, length) in zip(axes.flat, keys, strict=False):
        sub = [r for r in rows if r["kind"] == "prefill" and r["batch"] == 1 and (r["shape"], r["length"]) == (shape, length)]
        for backend, style in (("attnpatch-triton", "o-"), ("flex", "s--")):
            pts = sorted((r["density"], r["ms"]) for r in sub if r["backend"] == backend)
            if pts:
                ax.plot(*zip(*pts, strict=True), style, label=backend)
        for backend, color in (("sdpa-cudnn", "k"), ("sdpa-flash", "gray")):
            ms = next((r["ms"] for r in sub if r["backend"] == backend), None)
            if ms is not None and ms == ms:
                ax.axhline(ms, color=color, lw=1, ls=":", label=backend)
                if backend == "sdpa-cudnn":
                    xs = [0.02, 1.0]
                    ax.plot(xs, [x * ms / 0.8 for x in xs], color="tab:green", lw=1, label="target")
        ax.set(xscale="log", yscale="log", title=f"{shape} L={length // 1024}K", xlabel="density", ylabel="ms")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="attnpatch bench kernels", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="bench/results", help="output folder")
    p.add_argument("--shapes", default=",".join(SHAPES),
                   help=f"attention shapes, comma separated; of {', '.join(SHAPES)}")
    p.add_argument("--lengths", default=",".join(str(x) for x in LENGTHS), help="sequence lengths, comma separated")
    p.add_argument("--densities", default=",".join(str(x) for x in DENSITIES),
                   help="block densities of the random selections, comma separated")
    p.add_argument("--batches", default="1,4", help="batch sizes, comma separated")
    p.add_argument("--max-batch-tokens", type=int, default=131072, help="skip B·L above this")
    p.add_argument("--parts", default="prefill,skip,decode", help="what to measure, comma separated; of prefill, "
                   "skip (BLASST's skip rule), decode")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("attnpatch bench kernels needs a CUDA GPU", file=sys.stderr)
        return 2
    command = "attnpatch bench kernels " + " ".join(argv if argv is not None else sys.argv[1:])
    parts = args.parts.split(",")
    rows: list[Row] = []
    env = environment(command)

    def checkpoint():  # results so far survive a time limit
        write_results(rows, env, Path(args.out))

    if "prefill" in parts:
        bench_prefill(args.shapes.split(","), [int(x) for x in args.lengths.split(",")],
                      [float(x) for x in args.densities.split(",")], [int(x) for x in args.batches.split(",")],
                      max_batch_tokens=args.max_batch_tokens, rows=rows, checkpoint=checkpoint)
    if "skip" in parts:
        rows += bench_skip()
    if "decode" in parts:
        rows += bench_decode()
    write_results(rows, env, Path(args.out))
    print((Path(args.out) / "kernels.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
