"""Turn result JSON into a markdown page with tables and PNG plots.

Inputs: the suite's run JSON files (`attnpatch eval`) and, optionally, the kernel benchmark JSON
(`attnpatch bench kernels`). Plots: accuracy vs density per task (each method a marker, the
Pareto front a line), speedup over cuDNN vs context length per density, density per layer.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


def load_runs(folder: str | Path) -> list[dict]:
    runs = []
    for path in sorted(Path(folder).glob("*.json")):
        data = json.loads(path.read_text())
        if "scores" in data and "method" in data:
            runs.append(data)
    if not runs:
        raise ValueError(f"no suite results (JSON with 'scores' and 'method') in {folder}")
    return runs


def computed_density(run: dict) -> float:
    """Prefill density after skip rules: selected blocks × (1 − skipped share); 1 for dense runs."""
    density = 1.0 if run.get("density") is None else run["density"]
    return density * (1.0 - (run.get("skipped_fraction") or 0.0))


def layer_density(run: dict) -> list[float]:
    """Per-layer density after skip rules when the run recorded skipped tiles per layer, else the
    selected density (older runs; their skipped share is only known for the whole model)."""
    selected = run["density_per_layer"]
    skipped = run.get("skipped_per_layer")
    if not skipped:
        return selected
    return [d * (1.0 - s) for d, s in zip(selected, skipped, strict=True)]


def _label(run: dict) -> str:
    """`a_shape(local_blocks=4)`, then `+streaming(window=256)` for a decode method other than dense
    and `@triton` for a backend other than auto (older result files have neither)."""

    def one(name: str, options: dict) -> str:
        opts = ",".join(f"{k}={v}" for k, v in sorted(options.items()))
        return name + (f"({opts})" if opts else "")

    label = one(run["method"], run["options"])
    if run.get("decode", "dense") != "dense" or run.get("decode_options"):
        label += "+" + one(run["decode"], run.get("decode_options") or {})
    backend = (run.get("spec") or {}).get("backend", "auto")
    if backend != "auto":
        label += "@" + (backend if isinstance(backend, str)
                        else ",".join(f"{k}={v}" for k, v in sorted(backend.items())))
    return label


def _setting(run: dict) -> str:
    """Where a run ran: device, dtype and samples per task."""
    return f"{run['device']} {str(run['dtype']).removeprefix('torch.')} ×{run['limit']}"


def runs_table(runs: list[dict]) -> str:
    """One row per run; a `run on` column appears when the runs differ in device, dtype or samples."""
    tasks = sorted({t for r in runs for t in r["scores"]})
    mixed = len({_setting(r) for r in runs}) > 1
    head = "| L | method | computed density | skipped | recall | " + " | ".join(tasks) + " |"
    lines = [head + (" run on |" if mixed else ""), "|---|---|---|---|---|" + "---|" * (len(tasks) + mixed)]
    for r in sorted(runs, key=lambda r: (r["length"], r["method"] != "dense", _label(r))):
        skip = "-" if r.get("skipped_fraction") is None else f"{r['skipped_fraction']:.3f}"
        dens = f"{computed_density(r):.3f}"
        cells = [f"{r['scores'][t]:.3f}" if t in r["scores"] else "-" for t in tasks]
        recall = f"{r['fidelity']['recall']:.3f}" if (r.get("fidelity") or {}).get("recall") is not None else "-"
        label = _label(r) + (" (stopped before its end)" if r.get("complete") is False else "")
        row = f"| {r['length']} | {label} | {dens} | {skip} | {recall} | " + " | ".join(cells) + " |"
        lines.append(row + (f" {_setting(r)} |" if mixed else ""))
    return "\n".join(lines)


def pareto(points: list[tuple[float, float]], higher_is_better: bool = True) -> list[tuple[float, float]]:
    """Points not dominated by any other (lower density and better score), sorted by density."""
    sign = 1 if higher_is_better else -1
    front = []
    for d, s in sorted(points, key=lambda p: (p[0], -sign * p[1])):
        if not front or sign * s > sign * front[-1][1]:
            front.append((d, s))
    return front


NOMINAL_DENSITIES = (1.0, 0.5, 0.2, 0.1, 0.05, 0.02)


def nominal(density: float) -> float:
    """The benchmark's nominal density a measured one belongs to (closest on a log scale)."""
    return min(NOMINAL_DENSITIES, key=lambda d: abs(math.log(d) - math.log(max(density, 1e-6))))


def speedup_table(bench: dict) -> str:
    """Triton kernel speedup over cuDNN by length and density (batch 1, first shape)."""
    rows = [r for r in bench["rows"] if r["kind"] == "prefill" and r["batch"] == 1]
    shape = rows[0]["shape"] if rows else ""
    lengths = sorted({r["length"] for r in rows if r["shape"] == shape})
    dens = sorted({nominal(r["density"]) for r in rows if r["backend"] == "attnpatch-triton" and r["shape"] == shape},
                  reverse=True)
    lines = [f"Speedup of attnpatch-triton over SDPA cuDNN, {shape}, B=1", "",
             "| L | " + " | ".join(f"d={d}" for d in dens) + " |", "|---|" + "---|" * len(dens)]
    for n in lengths:
        cudnn = next(r["ms"] for r in rows if r["shape"] == shape and r["length"] == n and r["backend"] == "sdpa-cudnn")
        cells = []
        for d in dens:
            t = [r["ms"] for r in rows if r["shape"] == shape and r["length"] == n
                 and r["backend"] == "attnpatch-triton" and nominal(r["density"]) == d]
            cells.append(f"{cudnn / t[0]:.2f}x" if t else "-")
        lines.append(f"| {n // 1024}K | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs: list[dict], bench: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({t for r in runs for t in r["scores"]})
    panels = len(tasks) + 1 + (bench is not None)
    cols = min(3, panels)
    fig, axes = plt.subplots(math.ceil(panels / cols), cols, figsize=(4.4 * cols, 3.4 * math.ceil(panels / cols)),
                             squeeze=False)
    axes = list(axes.flat)
    lengths = sorted({r["length"] for r in runs})
    markers, styles = "os^Dv", ("--", ":", "-.", "-")
    labels = sorted({_label(r) for r in runs})
    colors = {label: f"C{i}" for i, label in enumerate(labels)}
    for ax, task in zip(axes, tasks, strict=False):
        better_high = task != "perplexity"
        for li, n in enumerate(lengths):  # one marker and one Pareto front per context length
            at_n = [r for r in runs if r["length"] == n and task in r["scores"]]
            for label in labels:
                pts = [(computed_density(r), r["scores"][task]) for r in at_n if _label(r) == label]
                if pts:
                    ax.scatter(*zip(*pts, strict=True), color=colors[label], marker=markers[li % len(markers)], s=26,
                               label=f"{label} L={n}")
            if at_n:
                front = pareto([(computed_density(r), r["scores"][task]) for r in at_n], better_high)
                ax.plot(*zip(*front, strict=True), color="gray", lw=0.8, ls=styles[li % len(styles)])
        ax.set(title=task, xlabel="prefill density (computed)",
               ylabel="score" if better_high else "perplexity (lower is better)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6)
    ax = axes[len(tasks)]
    for r in runs:
        if r.get("density_per_layer") and r["method"] != "dense":
            unknown = r.get("skipped_fraction") and not r.get("skipped_per_layer")  # older runs
            ax.plot(layer_density(r), label=f"{_label(r)} L={r['length']}" + (" (before skips)" if unknown else ""),
                    lw=1, color=colors[_label(r)],
                    ls=styles[lengths.index(r["length"]) % len(styles)])
    ax.set(title="computed density per layer", xlabel="layer", ylabel="density")
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    if bench is not None:
        ax = axes[len(tasks) + 1]
        rows = [r for r in bench["rows"] if r["kind"] == "prefill" and r["batch"] == 1]
        shape = rows[0]["shape"]
        for d in sorted({nominal(r["density"]) for r in rows if r["backend"] == "attnpatch-triton"}, reverse=True):
            pts = []
            for n in sorted({r["length"] for r in rows}):
                c = [r["ms"] for r in rows if r["shape"] == shape and r["length"] == n and r["backend"] == "sdpa-cudnn"]
                t = [r["ms"] for r in rows if r["shape"] == shape and r["length"] == n
                     and r["backend"] == "attnpatch-triton" and nominal(r["density"]) == d]
                if c and t:
                    pts.append((n, c[0] / t[0]))
            if pts:
                ax.plot(*zip(*pts, strict=True), "o-", label=f"density {d}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set(title=f"speedup over cuDNN ({shape})", xlabel="context length", ylabel="x", xscale="log", yscale="log")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[panels:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_report(results: str | Path, out: str | Path, bench: str | Path | None = None) -> Path:
    runs = load_runs(results)
    bench_data = json.loads(Path(bench).read_text()) if bench else None
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".png")
    plot(runs, bench_data, png)
    lines = [f"# attnpatch report — {runs[0]['model']}", "",
             f"{len(runs)} runs from `{results}`; device, dtype × samples per task: "
             f"{'; '.join(sorted({_setting(r) for r in runs}))}.", "", runs_table(runs), "",
             f"![plots]({png.name})", ""]
    if bench_data is not None:
        lines += [speedup_table(bench_data), "", f"Kernel benchmark: `{bench_data['environment']['command']}` on "
                  f"{bench_data['environment']['gpu']}.", ""]
    out.write_text("\n".join(lines))
    return out
