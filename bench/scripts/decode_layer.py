"""One decode layer at 128K (issue 12's per-layer target): Quest's whole step — page bounds, selection,
the sparse decode kernel — against the dense decodes (SDPA cuDNN / flash / efficient, the Triton kernel
over all pages), each a CUDA-graph replay of the same inputs, same run; plus the top-k kernel's launch
configurations (early exit × warps) on the rows such a step ranks.

    python bench/scripts/decode_layer.py --out $OUT/decode_layer          # on the H200, ~2 min

Inputs: Llama-3.1-8B's attention shape (32 query / 8 KV heads, head dim 128), bf16, random K/V and a
random query; Quest's page tables from those keys (what its cache layer keeps). Random keys make every
page look alike, so the selection's cost here is its worst case (no early stop of the radix search).
Writes `decode_layer.json` and `decode_layer.md` with the command.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from attnpatch.backends.triton.bound_decode import bound_decode_attention
from attnpatch.backends.triton.decode import sparse_decode_attention
from attnpatch.backends.triton.decode_op import sparse_decode
from attnpatch.bench.kernels import _bench_graph, environment
from attnpatch.cache import key_page_bounds
from attnpatch.methods.base import DecodeContext
from attnpatch.methods.decode import quest as quest_module
from attnpatch.methods.decode.quest import Quest
from attnpatch.sparsity import KeyBounds, PageSelection

HQ, HKV, D = 32, 8, 128
DEVICE, DTYPE = "cuda", torch.bfloat16  # per_call_rows and kernel_sweep_rows (a CPU smoke test sets "cpu", float32)
SDPA = {"sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-flash": SDPBackend.FLASH_ATTENTION,
        "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION}


class _Tables:
    """Stands in for Quest's cache layer: the page tables of the keys."""

    def __init__(self, key: torch.Tensor, page_size: int):
        self.page_size = page_size
        self.tables = (*key_page_bounds(key, page_size), torch.tensor(key.shape[2], device=key.device))

    def page_bounds(self):
        return self.tables


def _graph_us(fn) -> float | None:
    try:
        return _bench_graph(fn) * 1e3
    except Exception as e:  # noqa: BLE001  (a backend that cannot take the input or be captured)
        print(f"  failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
        torch.cuda.synchronize()
        return None


def _graph_us_each(fns) -> float | None:
    """µs per call of one CUDA graph that runs every `fns` in turn (distinct inputs, so no call reads
    what the one before left in L2; the graph's launch is shared by all)."""
    us = _graph_us(lambda: [fn() for fn in fns])
    return None if us is None else us / len(fns)


def layer_rows(length: int, batch: int, fraction: float) -> list[dict]:
    g = torch.Generator(device="cuda").manual_seed(length + batch)
    q = torch.randn(batch, HQ, 1, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(batch, HKV, length, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(batch, HKV, length, D, device="cuda", dtype=torch.bfloat16, generator=g)
    scale = D ** -0.5
    rows = []

    def add(row: str, us: float | None, **extra) -> None:
        rows.append({"length": length, "batch": batch, "row": row, "us": us, **extra})
        print(f"L={length} B={batch} {row}: {us if us is None else round(us, 2)} us", flush=True)

    for name, backend in SDPA.items():
        def dense(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        add(name, _graph_us(dense))
    every = PageSelection.all_pages(batch, HKV, length, 64, "cuda")
    add("triton all pages", _graph_us(lambda: sparse_decode_attention(q, k, v, every)))

    budget = int(length * fraction)
    tables = _Tables(k, 64)
    ctx = DecodeContext(0, scale, KeyBounds(), None, tables)
    fused = quest_module.group_top_pages

    def unfused(*args, **kwargs):  # the path before the fused kernel: torch masks + softmax, then top-k
        return None

    for label, options, patch in (
        ("quest", {}, fused),
        ("quest, top-k without the fused combine / masks", {}, unfused),
        ("quest, torch.topk", {"topk": "torch"}, fused),
        ("quest, group=max", {"group": "max"}, fused),
    ):
        method = Quest(budget=budget, dense_layers=0, **options)
        quest_module.group_top_pages = patch
        try:
            sel = method.select(q, k, ctx)
            kernel_us = _graph_us(lambda sel=sel: sparse_decode_attention(q, k, v, sel))
            select_us = _graph_us(lambda method=method: method.select(q, k, ctx))
            step_us = _graph_us(lambda method=method: sparse_decode_attention(q, k, v, method.select(q, k, ctx)))
        finally:
            quest_module.group_top_pages = fused
        add(f"{label} (budget {budget})", step_us, select_us=select_us, kernel_us=kernel_us)
    # the step as a compiled decode step runs it: inductor fuses the small tensor ops around the kernels
    method = Quest(budget=budget, dense_layers=0)
    compiled = torch.compile(lambda: sparse_decode(q, k, v, method.select(q, k, ctx), scale=scale), fullgraph=True)
    try:
        compiled()
        add(f"quest, torch.compile (budget {budget})", _graph_us(compiled))
    except Exception as e:  # noqa: BLE001
        print(f"  compiled quest failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
    best = min((r["us"] for r in rows if r["row"].startswith(("sdpa", "triton")) and r["us"]), default=None)
    for r in rows:
        r["speedup_vs_best_dense"] = None if best is None or not r["us"] else round(best / r["us"], 2)
    return rows


class _GivenTables:
    """Stands in for Quest's cache layer inside a compiled function: tables passed as arguments."""

    def __init__(self, page_min: torch.Tensor, page_max: torch.Tensor, written: torch.Tensor, page_size: int):
        self.page_size = page_size
        self.tables = (page_min, page_max, written)

    def page_bounds(self):
        return self.tables


def per_call_rows(length: int, batch: int, fraction: float, page_sizes: list[int], copies: int = 8,
                  validity: tuple[bool, ...] = (False, True)) -> list[dict]:
    """Each row timed per call inside one CUDA graph of `copies` calls on distinct inputs (own Q, K, V and
    page tables: nothing of one call is in L2 for the next, and the graph's launch is shared), as the
    layers of a compiled decode step run: SDPA cuDNN / flash and the Triton kernel over all pages (timed
    once, listed under every page size), then per page size Quest's compiled step (bounds + selection +
    kernel) without and with the static cache's per-key validity (what the HF path passes: `key_valid`
    read with each tile, the page lists clipped to `key_end` unless they stop there), the kernel alone
    over Quest's selection without / with `key_valid` / with `key_start`, the selection alone, and the one-launch
    kernel (bounds, selection and attention: `bound_decode_attention`) without / with `key_valid`. `validity`: which
    compiled steps to time (False: no validity, True: the static cache's)."""
    g = torch.Generator(device=DEVICE).manual_seed(length + batch)
    scale = D ** -0.5
    budget = int(length * fraction)
    qkv = [tuple(torch.randn(batch, h, n, D, device=DEVICE, dtype=DTYPE, generator=g)
                 for h, n in ((HQ, 1), (HKV, length), (HKV, length))) for _ in range(copies)]
    written = torch.tensor(length, device=DEVICE)
    valid = torch.ones(batch, length, dtype=torch.bool, device=DEVICE)
    end = torch.full((batch,), length, dtype=torch.long, device=DEVICE)
    first = torch.zeros(batch, dtype=torch.long, device=DEVICE)
    timed: list[tuple[str, float | None]] = []

    def add(row: str, fns) -> None:
        us = _graph_us_each(fns)
        timed.append((row, us))
        print(f"per call L={length} B={batch} {row}: {us if us is None else round(us, 2)} us", flush=True)

    for name, backend in SDPA.items():
        def dense(q, k, v, backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        add(name, [lambda x=x, f=dense: f(*x) for x in qkv])
    every = PageSelection.all_pages(batch, HKV, length, 64, DEVICE)
    add("triton all pages", [lambda x=x: sparse_decode_attention(*x, every) for x in qkv])
    dense_rows = list(timed)
    rows = []
    for page_size in page_sizes:
        timed[:] = []
        method = Quest(budget=budget, page_size=page_size, dense_layers=0)
        inputs = [(*x, *key_page_bounds(x[1], page_size)) for x in qkv]

        def step(q, k, v, lo, hi, static: bool, method=method, page_size=page_size):
            bounds = KeyBounds(key_valid=valid, key_end=end, key_first=first) if static else KeyBounds()
            sel = method.select(q, k, DecodeContext(0, scale, bounds, None, _GivenTables(lo, hi, written, page_size)))
            if static and not sel.within_written:  # as the dispatcher does (attnpatch.dispatch._select_pages)
                sel = sel.clipped(end)
            return sparse_decode(q, k, v, sel, scale=scale, key_valid=bounds.key_valid)

        for static in validity:
            compiled = torch.compile(lambda *x, s=static, f=step: f(*x, s), fullgraph=True)
            try:
                compiled(*inputs[0])
            except Exception as e:  # noqa: BLE001
                print(f"  compiled quest failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            label = "with the HF static cache's key_valid (and clip)" if static else "no validity"
            add(f"quest compiled, {label} (budget {budget})", [lambda x=x, c=compiled: c(*x) for x in inputs])
        ctx = [DecodeContext(0, scale, KeyBounds(), None, _GivenTables(x[3], x[4], written, page_size)) for x in inputs]
        pairs = [(x, method.select(x[0], x[1], c), c) for x, c in zip(inputs, ctx, strict=True)]
        for label, extra in (("", {}), (", key_valid", {"key_valid": valid}), (", key_start", {"key_start": first})):
            add(f"quest kernel alone{label}",
                [lambda x=x, s=s, kw=extra: sparse_decode_attention(*x[:3], s, **kw) for x, s, _ in pairs])
        add("quest select alone", [lambda x=x, c=c, m=method: m.select(x[0], x[1], c) for x, _, c in pairs])
        n_pages = -(-length // page_size)
        pages = (n_pages, budget // page_size, first, torch.full((batch,), n_pages, dtype=torch.long, device=DEVICE))
        for label, extra in (("", {}), (", key_valid", {"key_valid": valid})):
            kw = dict(extra, page_size=page_size, scale=scale, keep_last=method.local_pages)
            add(f"quest one launch{label}",
                [lambda x=x, kw=kw, p=pages: bound_decode_attention(*x, *p, **kw) for x in inputs])
        rows += [{"length": length, "batch": batch, "page_size": page_size, "row": row, "us_each": us}
                 for row, us in dense_rows + timed]
        del inputs, ctx, pairs
    best = min((us for row, us in dense_rows if us), default=None)
    for r in rows:
        r["speedup_vs_best_dense"] = None if best is None or not r["us_each"] else round(best / r["us_each"], 2)
    return rows


def _per_call_md(command: str, env: dict, rows: list[dict]) -> str:
    out = [f"# One decode layer per call in a CUDA graph of distinct inputs — {env.get('gpu')}", "", f"`{command}`", "",
           "Llama-3.1-8B attention shape, bf16, random Q/K/V; Quest at the budget shown (dense_layers=0).", "",
           "| L | B | page | row | µs per call | × best dense |", "|---|---|---|---|---|---|"]
    for r in rows:
        us = "–" if r["us_each"] is None else f"{r['us_each']:.1f}"
        out.append(f"| {r['length']} | {r['batch']} | {r['page_size']} | {r['row']} | {us} | "
                   f"{r['speedup_vs_best_dense'] or '–'} |")
    return "\n".join(out) + "\n"


def topk_rows(configs: list[str]) -> list[dict]:
    from attnpatch.backends.triton.topk_select import group_topk_ascending_triton

    rows = []
    for n, hrows in ((2048, 32), (2048, 8), (2048, 64), (1024, 64)):
        g = torch.Generator(device="cuda").manual_seed(n)
        bounds = torch.randn(hrows, 1, 4, n, device="cuda", generator=g) * 3
        first = torch.zeros(hrows, dtype=torch.long, device="cuda")
        end = torch.tensor(n, device="cuda")
        for config in configs:
            os.environ["ATTNPATCH_TOPK_CONFIG"] = config
            us = _graph_us(lambda b=bounds, k=n // 16, f=first, e=end: group_topk_ascending_triton(b, k, f, e))
            rows.append({"n": n, "rows": hrows, "config": config, "us": us})
            print(f"topk n={n} rows={hrows} search,warps={config}: {us} us", flush=True)
        os.environ.pop("ATTNPATCH_TOPK_CONFIG", None)
    return rows


SWEEP_LAUNCHES = ("4,2", "4,3", "4,4", "8,2", "8,3", "2,3")
SWEEP_SPLITS = (None, 1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128)
SWEEP_BOUNDS = ("32,4", "64,4", "128,4", "64,8", "128,8")  # block_n,warps
SWEEP_TOPK = ("1,4", "1,8", "1,16", "2,4", "2,8", "2,16")  # search,warps (topk_select.SEARCHES)
SWEEP_BOUND = ("0,4,2", "0,4,3", "0,8,2", "8,4,2", "32,4,2")  # splits (0: the rule's),warps,stages
SWEEP_KERNELS = ("decode", "page_bounds", "topk", "bound")
COPIES = 8  # distinct inputs per graph for the per-call column


def kernel_sweep_rows(length: int, batch: int, fraction: float, splits_list=SWEEP_SPLITS,
                      kernels=SWEEP_KERNELS) -> list[dict]:
    """The decode kernel over Quest's selection (1/16 of 64-token pages) by tile × warps,stages × splits,
    the page-bound kernel by launch (`SWEEP_BOUNDS`) and the group top-k by search,warps; µs per
    CUDA-graph replay of one call (`us`: at batch 1 the 1/16 of a 128K cache it reads stays in the H200's
    L2 from one replay to the next) and per call in a graph of `COPIES` calls on distinct inputs
    (`us_each`: no graph launch per call, cold L2 as in a step; the launches are ranked by it)."""
    from attnpatch.backends.decode_plan import resolve_num_splits
    from attnpatch.estimators.page_bounds import page_upper_bounds_torch
    from attnpatch.estimators.page_bounds_triton import page_upper_bounds_triton

    g = torch.Generator(device=DEVICE).manual_seed(length + batch)
    q = torch.randn(batch, HQ, 1, D, device=DEVICE, dtype=DTYPE, generator=g)
    k = torch.randn(batch, HKV, length, D, device=DEVICE, dtype=DTYPE, generator=g)
    v = torch.randn(batch, HKV, length, D, device=DEVICE, dtype=DTYPE, generator=g)
    tables = _Tables(k, 64)
    ctx = DecodeContext(0, D ** -0.5, KeyBounds(), None, tables)
    sel = Quest(budget=int(length * fraction), dense_layers=0).select(q, k, ctx)
    rows = []
    # cold inputs for `us_each`: COPIES distinct Q/K/V (the selection of the first), none left in L2 by the last call
    cold = [(q, k, v)] + [tuple(torch.randn_like(x) for x in (q, k, v)) for _ in range(COPIES - 1)] \
        if "decode" in kernels else []
    for tile in (64, 128) if "decode" in kernels else ():
        for launch in SWEEP_LAUNCHES:
            os.environ["ATTNPATCH_DECODE_CONFIG"] = launch
            for splits in splits_list:
                used = resolve_num_splits(sel, DEVICE, splits, tile)
                us = _graph_us(
                    lambda s=splits, t=tile: sparse_decode_attention(q, k, v, sel, num_splits=s, tile_size=t))
                each = None if us is None else _graph_us_each(
                    [lambda x=x, s=splits, t=tile: sparse_decode_attention(*x, sel, num_splits=s, tile_size=t)
                     for x in cold])
                rows.append({"kernel": "decode", "length": length, "batch": batch, "tile": tile, "launch": launch,
                             "splits": used, "default_splits": splits is None, "us": us, "us_each": each})
                print(f"decode L={length} B={batch} tile={tile} warps,stages={launch} splits={used}: {us} "
                      f"(cold, in a graph of {COPIES}: {each})", flush=True)
    os.environ.pop("ATTNPATCH_DECODE_CONFIG", None)
    del cold
    page_min, page_max, _ = tables.tables
    n = page_min.shape[2]
    sweep_bounds = "page_bounds" in kernels
    copies = [(page_min.clone(), page_max.clone()) for _ in range(COPIES)] if sweep_bounds else []
    reference = page_upper_bounds_torch(q, page_min, page_max) if sweep_bounds else None
    for launch in SWEEP_BOUNDS if sweep_bounds else ():
        os.environ["ATTNPATCH_BOUNDS_CONFIG"] = launch
        us = _graph_us(lambda: page_upper_bounds_triton(q, page_min, page_max, n, 1.0))
        each = _graph_us_each([lambda lo=lo, hi=hi: page_upper_bounds_triton(q, lo, hi, n, 1.0) for lo, hi in copies])
        err = None if each is None else (
            page_upper_bounds_triton(q, page_min, page_max, n, 1.0) - reference).abs().max().item()
        rows.append({"kernel": "page_bounds", "length": length, "batch": batch, "launch": launch, "us": us,
                     "us_each": each, "max_abs_err_vs_fp32": err,
                     "gb_per_s": None if not each else round(2 * page_min.numel() * 2 / each / 1e3, 1)})
        print(f"bounds L={length} B={batch} launch={launch}: {us} (in a graph of {COPIES}: {each}; error {err})",
              flush=True)
    os.environ.pop("ATTNPATCH_BOUNDS_CONFIG", None)
    del copies
    if "topk" in kernels:
        from attnpatch.backends.triton.topk_select import group_topk_ascending_triton

        k_pages = max(int(length * fraction) // 64, 1)
        bounds = [page_upper_bounds_triton(q * (1 + i / COPIES), page_min, page_max, n, D ** -0.5)
                  for i in range(COPIES)]
        first = torch.zeros(batch, dtype=torch.long, device=DEVICE)
        # 64-token pages, and the first half of each row as the page count of 128-token pages
        for pages, kp in ((n, k_pages), (n // 2, max(k_pages // 2, 1))):
            rows_in = [x[..., :pages].contiguous() for x in bounds]
            stop = torch.tensor(pages, device=DEVICE)
            for launch in SWEEP_TOPK:
                os.environ["ATTNPATCH_TOPK_CONFIG"] = launch
                us = _graph_us(lambda r=rows_in[0], kp=kp, e=stop: group_topk_ascending_triton(r, kp, first, e))
                each = _graph_us_each([lambda x=x, kp=kp, e=stop: group_topk_ascending_triton(x, kp, first, e)
                                       for x in rows_in])
                rows.append({"kernel": "topk", "length": length, "batch": batch, "pages": pages, "k": kp,
                             "launch": launch, "us": us, "us_each": each})
                print(f"topk L={length} B={batch} pages={pages} k={kp} search,warps={launch}: {us} "
                      f"(in a graph of {COPIES}: {each})", flush=True)
        os.environ.pop("ATTNPATCH_TOPK_CONFIG", None)
    if "bound" in kernels:
        rows += _bound_sweep_rows(length, batch, fraction, q, k, v)
    return rows


def _bound_sweep_rows(length: int, batch: int, fraction: float, q, k, v) -> list[dict]:
    """The one-launch kernel (`bound_decode_attention`: bounds, selection, attention) by `SWEEP_BOUND`
    launch at 64- and 128-token pages, per call in a graph of `COPIES` calls on distinct inputs."""
    from attnpatch.backends.triton.bound_decode import choose_splits

    rows = []
    cold = [(q, k, v)] + [tuple(torch.randn_like(x) for x in (q, k, v)) for _ in range(COPIES - 1)]
    for page in (64, 128):
        inputs = [(*x, *key_page_bounds(x[1], page)) for x in cold]
        n = -(-length // page)
        pages = (n, max(int(length * fraction) // page, 1), torch.zeros(batch, dtype=torch.long, device=DEVICE),
                 torch.full((batch,), n, dtype=torch.long, device=DEVICE))
        for launch in SWEEP_BOUND:
            os.environ["ATTNPATCH_BOUND_DECODE_CONFIG"] = launch
            each = _graph_us_each(
                [lambda x=x, p=page, s=pages: bound_decode_attention(*x, *s, page_size=p, scale=D ** -0.5)
                 for x in inputs])
            splits = (int(launch.split(",")[0])
                      or choose_splits(batch * HKV, -(-pages[1] * page // max(page, 64)), DEVICE))
            rows.append({"kernel": "bound", "length": length, "batch": batch, "tile": f"{page}-token pages",
                         "launch": launch, "splits": splits, "default_splits": launch.startswith("0,"), "us": None,
                         "us_each": each})
            print(f"bound L={length} B={batch} page={page} splits,warps,stages={launch}: {each} per call", flush=True)
        del inputs
    os.environ.pop("ATTNPATCH_BOUND_DECODE_CONFIG", None)
    return rows


def best_launches(rows: list[dict]) -> dict[str, dict[str, str]]:
    """Per `LENGTHxBATCH`, the fastest launch of each kernel in the form its override variable reads:
    decode `"warps,stages,splits,tile"`, page bounds `"block_n,warps"`, top-k `"search,warps"` and the
    one-launch kernel `"splits,warps,stages"` per page size (by `us_each`, per call in a graph of distinct inputs)."""
    best: dict[str, dict[str, str]] = {}
    for kernel in SWEEP_KERNELS:
        col = "us_each"
        for r in sorted((r for r in rows if r["kernel"] == kernel and r.get(col)), key=lambda r: r[col], reverse=True):
            launch = f"{r['launch']},{r['splits']},{r['tile']}" if kernel == "decode" else r["launch"]
            pages = f"_p{r['pages']}" if "pages" in r else f"_{r['tile'].split('-')[0]}" if kernel == "bound" else ""
            best.setdefault(f"{r['length']}x{r['batch']}", {})[kernel + pages] = launch
    return best


def _sweep_md(rows: list[dict]) -> str:
    out = ["# Decode, page-bound, top-k and one-launch (bound) kernels by launch configuration "
           "(µs, CUDA-graph replay)", "",
           f"`us`: one call per graph; `per call in a graph`: {COPIES} calls on distinct inputs in one graph.", "",
           "| L | B | kernel | tile (top-k: row) | launch | splits | µs | µs per call in a graph |",
           "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["length"], r["batch"], r["kernel"], r.get("us_each") or r["us"] or 1e9)):
        us = "–" if r["us"] is None else f"{r['us']:.1f}"
        each = "" if r.get("us_each") is None else f"{r['us_each']:.1f}"
        split = f"{r.get('splits', '')}{' (default)' if r.get('default_splits') else ''}"
        tile = r.get("tile", f"{r['pages']} pages, k {r['k']}" if "pages" in r else "")
        out.append(f"| {r['length']} | {r['batch']} | {r['kernel']} | {tile} | {r['launch']} | {split} | {us} "
                   f"| {each} |")
    return "\n".join(out) + "\n"


def _md(result: dict) -> str:
    out = [f"# One decode layer, Llama-3.1-8B shape ({HQ}/{HKV}/{D}), bf16 — {result['env'].get('gpu')}", "",
           f"`{result['command']}`", "", "CUDA-graph replay of each call (µs); Quest = page bounds + selection + "
           "sparse decode kernel, budget 1/16 of the keys, 64-token pages, random keys; top-k launch "
           f"`search,warps` = {result.get('best_topk_config', 'default')}.", "",
           "| L | B | row | µs | select µs | kernel µs | × best dense |", "|---|---|---|---|---|---|---|"]

    def f(x):
        return "–" if x is None else f"{x:.1f}"

    for r in result["layer"]:
        out.append(f"| {r['length']} | {r['batch']} | {r['row']} | {f(r['us'])} | {f(r.get('select_us'))} | "
                   f"{f(r.get('kernel_us'))} | {r['speedup_vs_best_dense'] or '–'} |")
    out += ["", "Top-k kernel (group combine + masks + selection, G = 4, k = n/16), µs by `search,warps`:", "",
            "| n | rows | search,warps | µs |", "|---|---|---|---|"]
    out += [f"| {r['n']} | {r['rows']} | {r['config']} | {f(r['us'])} |" for r in result["topk"]]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/results/decode_layer")
    p.add_argument("--cases", default="131072x1,131072x4,131072x8,65536x8", help="LENGTHxBATCH, comma separated")
    p.add_argument("--fraction", type=float, default=1 / 16)
    p.add_argument("--topk-configs", nargs="+", default=["0,4", "1,4", "0,8", "1,8", "0,2", "1,2"],
                   help="top-k launches to sweep, each 'search,warps' (the fastest at 128K, batch 4, "
                        "is used by the layer rows)")
    p.add_argument("--kernel-sweep", action="store_true",
                   help="only sweep the decode / page-bound / top-k kernels' launch configurations over --cases")
    p.add_argument("--splits", type=lambda t: [None if x == "default" else int(x) for x in t.split(",")],
                   default=list(SWEEP_SPLITS), help="--kernel-sweep: split counts ('default' = the rule's)")
    p.add_argument("--kernels", type=lambda t: tuple(t.split(",")), default=SWEEP_KERNELS,
                   help=f"--kernel-sweep: which kernels, a comma list of {', '.join(SWEEP_KERNELS)}")
    p.add_argument("--per-call", action="store_true",
                   help="only time each layer row per call inside a CUDA graph of --copies distinct inputs")
    p.add_argument("--page-sizes", default="64", help="--per-call: Quest's page sizes (comma list)")
    p.add_argument("--copies", type=int, default=COPIES, help="--per-call: distinct inputs per graph")
    args = p.parse_args(argv)
    if set(args.kernels) - set(SWEEP_KERNELS):
        p.error(f"--kernels takes a comma list of {', '.join(SWEEP_KERNELS)}, got {','.join(args.kernels)!r}")
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    cases = [tuple(int(x) for x in case.split("x")) for case in args.cases.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.per_call:
        env, rows = environment(command), []
        page_sizes = [int(x) for x in args.page_sizes.split(",")]
        for length, batch in cases:
            rows += per_call_rows(length, batch, args.fraction, page_sizes, args.copies)
            torch.cuda.empty_cache()
            (out / "per_call.json").write_text(json.dumps({"command": command, "env": env, "rows": rows},
                                                          indent=1, default=str))
            (out / "per_call.md").write_text(_per_call_md(command, env, rows))
        print((out / "per_call.md").read_text())
        return 0
    if args.kernel_sweep:
        rows = []
        for length, batch in cases:
            rows += kernel_sweep_rows(length, batch, args.fraction, args.splits, args.kernels)
            torch.cuda.empty_cache()
        best = best_launches(rows)
        (out / "kernel_sweep.json").write_text(json.dumps({"command": command, "env": environment(command),
                                                           "best": best, "rows": rows}, indent=1, default=str))
        (out / "kernel_sweep.md").write_text(f"`{command}`\n\n" + _sweep_md(rows))
        for case, launches in best.items():  # for a later run's ATTNPATCH_{DECODE,BOUNDS,TOPK}_CONFIG
            for kernel, launch in launches.items():
                (out / f"best_{kernel}_{case}.txt").write_text(launch + "\n")
        print(json.dumps(best))
        return 0
    configs = args.topk_configs
    result = {"command": command, "env": environment(command), "topk": topk_rows(configs), "layer": []}
    timed = [r for r in result["topk"] if r["n"] == 2048 and r["rows"] == 32 and r["us"]]
    if timed:  # the fastest launch at 128K, batch 4: what the layer rows (and a later run) use
        best = min(timed, key=lambda r: r["us"])["config"]
        os.environ["ATTNPATCH_TOPK_CONFIG"] = result["best_topk_config"] = best
        (out / "best_topk_config.txt").write_text(best + "\n")
    for length, batch in cases:
        result["layer"] += layer_rows(length, batch, args.fraction)
        torch.cuda.empty_cache()
    (out / "decode_layer.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "decode_layer.md").write_text(_md(result))
    print(_md(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
