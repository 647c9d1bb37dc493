"""Method benchmark: every registered prefill method at the attention-layer level, estimation
included, next to the dense kernels, on the same inputs in the same run.

    python -m attnpatch.bench.methods --out DIR [--shapes llama3-8b,qwen2.5-7b] [--lengths 32768,65536,131072]
                                      [--methods a_shape xattention:threshold=0.95 ...]

Inputs: `attnpatch.bench.synthetic.planted_qkv` (sinks, local band, vertical stripes, slashes,
needles). Per (shape, length): SDPA cuDNN and SDPA flash dense causal, flash-attn-4 dense (when
installed); per method spec (default: every registered prefill method at its defaults): the time of
its `select` (estimate + selection), of the selection on the `auto` backend and on FlexAttention
(the same selection), the density it chose, the estimate's share of the total, and the speedup of
select + auto over cuDNN and over the fastest dense row. Writes `methods.json` and `methods.md`;
results are saved after every row.

Real inputs: `--real smollm2:8192:15` adds Q/K/V captured from layer 15 of the embedded checkpoint
on a window of Pride and Prejudice of 8192 tokens (through `Patch.observe` on a dense patch), as the
shape `smollm2-L15` (9 query / 3 key-value heads, head dim 64); `gemma3-270m:32768:5` takes a Gemma
full-attention layer (4 / 1 heads, head dim 256).

Peer row: `--peer-flexprefill FILE` times FlexPrefill's published op (`flex_prefill_attention` from
its `flex_prefill/ops/flex_prefill_attention.py`, fetched at benchmark time into an ignored folder,
never committed) on the same Q/K/V at its defaults (γ 0.9, τ 0.1, min budget 512, block 128), with the
density it reports converted to causal block pairs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from attnpatch.backends import BACKENDS, resolve_backend
from attnpatch.bench.kernels import SHAPES, _bench, _dense_runner, environment
from attnpatch.bench.synthetic import planted_qkv
from attnpatch.methods.base import DenseFallback, PrefillContext
from attnpatch.registry import method_infos
from attnpatch.sparsity import BlockSelection, KeyBounds
from attnpatch.spec import PatchSpec

LENGTHS = (32768, 65536, 131072)
SHAPES = {**SHAPES, "tiny": (4, 2, 16)}  # "tiny": CPU smoke runs
FLEX = BACKENDS["flex"]


@dataclass
class Row:
    shape: str
    length: int
    name: str
    spec: str = ""
    density: float | None = None
    select_ms: float | None = None
    exec_ms: float | None = None
    total_ms: float | None = None
    backend: str = ""
    flex_ms: float | None = None
    estimate_share: float | None = None
    speedup_vs_cudnn: float | None = None
    speedup_vs_best_dense: float | None = None
    note: str = ""


def default_specs() -> list[str]:
    return [m.name for m in method_infos("prefill") if m.name != "dense"]


def _timed(fn: Callable[[], object]) -> tuple[float, object]:
    """Median ms of `fn` and one result (the benchmark's timer; one call outside the timing)."""
    result = fn()
    return _bench(fn), result


def method_rows(shape: str, length: int, q, k, v, specs: list[str], log=print) -> list[Row]:
    hq = q.shape[1]
    scale = q.shape[-1] ** -0.5
    ctx = PrefillContext(0, scale, KeyBounds(), None)
    plan = resolve_backend("auto")
    rows = []
    for text in specs:
        spec = PatchSpec.parse(text)
        info = next(m for m in method_infos("prefill") if m.name == spec.method)
        method = info.build(spec.prefill_options, hq)
        row = Row(shape, length, spec.method, text)
        try:
            select_ms, selection = _timed(lambda method=method: method.select(q, k, ctx))
        except Exception as e:  # noqa: BLE001  (a method failing at this size is a result, not a crash)
            row.note = f"select failed: {type(e).__name__}: {e}"
            rows.append(row)
            continue
        row.select_ms = select_ms
        if isinstance(selection, DenseFallback):
            row.note = f"dense fallback: {selection.reason}"
            rows.append(row)
            continue
        kept, total = selection.kept_and_total()
        row.density = float(kept.sum() / total.sum())
        declined: list[str] = []

        def run(selection=selection, declined=declined):
            return plan.prefill(q, k, v, selection, scale=scale, bounds=KeyBounds(), declined=declined)[0]

        row.exec_ms, _ = _timed(run)
        row.backend = plan.prefill(q, k, v, selection, scale=scale, bounds=KeyBounds(), declined=[])[1]
        if declined:
            row.note = "; ".join(sorted(set(declined)))
        if isinstance(selection, BlockSelection) and FLEX.prefill_reason(q, k, v, selection, KeyBounds()) is None:
            try:
                row.flex_ms, _ = _timed(lambda selection=selection: FLEX.prefill(q, k, v, selection, scale=scale,
                                                                                 bounds=KeyBounds()))
            except Exception as e:  # noqa: BLE001
                row.note += f" flex failed: {type(e).__name__}"
        row.total_ms = row.select_ms + row.exec_ms
        row.estimate_share = row.select_ms / row.total_ms
        rows.append(row)
        log(f"{shape} {length} {text}: density {row.density:.3f} select {row.select_ms:.3f} ms + "
            f"{row.backend} {row.exec_ms:.3f} ms")
    return rows


def dense_rows(shape: str, length: int, q, k, v) -> list[Row]:
    rows = []
    for name in ("cudnn", "flash"):
        fn, note = _dense_runner(name, q, k, v) if q.is_cuda else (None, "needs CUDA")
        ms = _bench(fn) if fn is not None else None
        rows.append(Row(shape, length, f"sdpa-{name}", density=1.0, total_ms=ms, note=note or ""))
    flash = BACKENDS["flash"]
    why = flash.unavailable(q.device) or flash.dense_reason(q, k, v, KeyBounds())
    ms = None if why else _bench(lambda: flash.dense(q, k, v, scale=q.shape[-1] ** -0.5, bounds=KeyBounds()))
    rows.append(Row(shape, length, "fa4-dense", density=1.0, total_ms=ms, note=why or ""))
    return rows


def captured_qkv(model_name: str, length: int, layer: int, device: torch.device, dtype: torch.dtype):
    """`(q, k, v)` `[1, H, L, D]` that `layer` of a real checkpoint receives on `length` tokens of Pride and
    Prejudice (dense prefill, no LM head; recorded as calibration records it)."""
    from attnpatch.calibrate.record import record_layers
    from attnpatch.eval.texts import austen
    from attnpatch.eval.tokens import leading_ids, text_window
    from attnpatch.models import load

    model, tok = load(model_name, device=str(device), dtype=dtype)
    ids = text_window(tok, austen(), length - len(leading_ids(tok)))
    rec = record_layers(model, [ids], keep_window_layers=True).get(layer)
    if rec is None:
        raise ValueError(f"{model_name} has no layer {layer}")
    return rec.query[0], rec.key[0], rec.value[0]


def load_peer(path: str, name: str = "flex_prefill_attention") -> Callable:
    """The function `name` of a peer's Python file (a benchmark-time download; not part of attnpatch)."""
    spec = importlib.util.spec_from_file_location("attnpatch_peer_" + Path(path).stem, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


def flexprefill_peer_row(shape: str, length: int, q, k, v, op: Callable, gamma: float = 0.9, tau: float = 0.1,
                         min_budget: int = 512, block: int = 128) -> Row:
    """FlexPrefill's own op (layout [B, L, H, D], batch 1) on the same inputs; its reported ratio counts
    kept blocks over the full block square, converted here to causal block pairs."""
    row = Row(shape, length, "peer:flexprefill", f"peer:flexprefill(gamma={gamma},tau={tau},min_budget={min_budget})",
              backend="peer op")
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))

    def call():
        return op(qt, kt, vt, gamma=gamma, tau=tau, min_budget=min_budget, block_size=block,
                  return_computational_ratio=True)

    try:
        row.total_ms, (_, ratio) = _timed(call)
    except Exception as e:  # noqa: BLE001  (the peer failing is a result)
        row.note = f"peer op failed: {type(e).__name__}: {e}"
        return row
    n = math.ceil(length / block)
    row.density = float(ratio) * n * n / (n * (n + 1) / 2)
    row.note = "FlexPrefill's published op (estimate + its Triton block kernel), fetched at benchmark time"
    return row


def add_speedups(rows: list[Row]) -> None:
    for key in {(r.shape, r.length) for r in rows}:
        group = [r for r in rows if (r.shape, r.length) == key]
        cudnn = next((r.total_ms for r in group if r.name == "sdpa-cudnn" and r.total_ms), None)
        dense = [r.total_ms for r in group if r.spec == "" and r.total_ms]
        best = min(dense) if dense else None
        for r in group:
            if r.spec and r.total_ms is not None:
                r.speedup_vs_cudnn = cudnn / r.total_ms if cudnn else None
                r.speedup_vs_best_dense = best / r.total_ms if best else None


def markdown(data: dict) -> str:
    env = data["environment"]
    lines = [f"# Methods at the attention-layer level — {env.get('gpu') or 'CPU'}", "",
             f"torch {env.get('torch')}, triton {env.get('triton')}, {data['dtype']}; planted synthetic Q/K/V "
             "(`attnpatch.bench.synthetic`) and, in rows named after a checkpoint, Q/K/V captured from it; B = 1.",
             "", f"Command: `{env.get('command')}`", "",
             "| shape | L | row | density | select ms | exec ms (backend) | flex ms | total ms | estimate share "
             "| vs cuDNN | vs best dense | note |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(x, spec=".3f"):
        return "–" if x is None else format(x, spec)

    for r in data["rows"]:
        lines.append(f"| {r['shape']} | {r['length'] // 1024}K | {r['spec'] or r['name']} | {f(r['density'])} | "
                     f"{f(r['select_ms'])} | {f(r['exec_ms'])} ({r['backend'] or '–'}) | {f(r['flex_ms'])} | "
                     f"{f(r['total_ms'])} | {f(r['estimate_share'], '.0%')} | {f(r['speedup_vs_cudnn'], '.2f')} | "
                     f"{f(r['speedup_vs_best_dense'], '.2f')} | {r['note']} |")
    return "\n".join(lines) + "\n"


def plot(data: dict, path: Path) -> None:
    """Speedup over cuDNN (estimation included) against context length, one panel per shape, a line per
    method spec (the peer dashed); nothing when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [r for r in data["rows"] if r["spec"] and r["speedup_vs_cudnn"]]
    shapes = sorted({r["shape"] for r in rows})
    if not shapes:
        return
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.5), squeeze=False)
    for ax, shape in zip(axes[0], shapes, strict=True):
        for spec in dict.fromkeys(r["spec"] for r in rows if r["shape"] == shape):
            pts = sorted((r["length"], r["speedup_vs_cudnn"]) for r in rows
                         if r["shape"] == shape and r["spec"] == spec)
            ax.plot([p[0] // 1024 for p in pts], [p[1] for p in pts], "--" if spec.startswith("peer") else "-",
                    marker="o", label=spec[:40])
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (K tokens)")
        ax.set_ylabel("speedup over SDPA cuDNN (estimate included)")
        ax.set_title(shape)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m attnpatch.bench.methods", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/results/methods", help="output folder")
    p.add_argument("--shapes", default="llama3-8b,qwen2.5-7b", help=f"of {', '.join(SHAPES)}")
    p.add_argument("--lengths", default=",".join(str(x) for x in LENGTHS))
    p.add_argument("--methods", nargs="+", default=None, help="method specs (default: every prefill method)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--budget-s", type=float, default=480.0, help="start no new (shape, length) after this")
    p.add_argument("--plot-only", default=None, metavar="JSON",
                   help="redraw methods.md and methods.png from a methods.json into --out, measure nothing")
    p.add_argument("--real", nargs="*", default=[], metavar="MODEL:LENGTH:LAYER",
                   help="also Q/K/V captured from a real checkpoint's layer, e.g. smollm2:8192:15")
    p.add_argument("--peer-flexprefill", default=None, metavar="FILE",
                   help="FlexPrefill's flex_prefill_attention.py (fetched at benchmark time): adds its op as a row")
    args = p.parse_args(argv)
    if args.plot_only:
        data = json.loads(Path(args.plot_only).read_text())
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "methods.md").write_text(markdown(data))
        plot(data, out / "methods.png")
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("the method benchmark needs a CUDA GPU (or --device cpu for a smoke run)", file=sys.stderr)
        return 2
    real = []
    for item in args.real:
        parts = item.split(":")
        if len(parts) != 3 or not (parts[1].isdigit() and parts[2].isdigit()):
            p.error("--real takes MODEL:LENGTH:LAYER with integer length and layer (e.g. smollm2:8192:15), "
                    f"got {item!r}")
        real.append((parts[0], int(parts[1]), int(parts[2])))
    specs = args.methods or default_specs()
    peer = load_peer(args.peer_flexprefill) if args.peer_flexprefill else None
    for text in specs:
        PatchSpec.parse(text)  # bad specs fail before any timing
    dtype = getattr(torch, args.dtype)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m attnpatch.bench.methods " + " ".join(argv if argv is not None else sys.argv[1:])
    data = {"environment": environment(command), "dtype": args.dtype, "rows": []}
    start = time.perf_counter()
    rows: list[Row] = []
    for shape in args.shapes.split(","):
        hq, hkv, d = SHAPES[shape]
        for length in (int(x) for x in args.lengths.split(",")):
            if time.perf_counter() - start > args.budget_s:
                print(f"time budget reached: {shape} {length} not run", file=sys.stderr)
                continue
            q, k, v = planted_qkv(1, hq, hkv, length, d, device=device, dtype=dtype)
            rows += dense_rows(shape, length, q, k, v) + method_rows(shape, length, q, k, v, specs)
            if peer is not None:
                rows.append(flexprefill_peer_row(shape, length, q, k, v, peer))
            add_speedups(rows)
            data["rows"] = [asdict(r) for r in rows]
            (out / "methods.json").write_text(json.dumps(data, indent=1))
            (out / "methods.md").write_text(markdown(data))
            del q, k, v
    for model_name, length, layer in real:
        q, k, v = captured_qkv(model_name, length, layer, device, dtype)
        shape = f"{model_name}-L{layer}"
        rows += dense_rows(shape, length, q, k, v) + method_rows(shape, length, q, k, v, specs)
        if peer is not None and q.shape[-1] in (16, 32, 64, 128):
            rows.append(flexprefill_peer_row(shape, length, q, k, v, peer))
        add_speedups(rows)
        data["rows"] = [asdict(r) for r in rows]
        (out / "methods.json").write_text(json.dumps(data, indent=1))
        (out / "methods.md").write_text(markdown(data))
    plot(data, out / "methods.png")
    print(markdown(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
