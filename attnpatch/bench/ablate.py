"""One-off GPU ablations behind the kernel defaults: Q pre-scaling, skip-mode overhead, decode tiles/splits.

`python -m attnpatch.bench.ablate --out DIR` → ablate.json (every timing, cuDNN / SDPA in the same run).
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch

from attnpatch.backends.triton.block_sparse import block_sparse_attention_triton
from attnpatch.backends.triton.decode import sparse_decode_attention
from attnpatch.bench.kernels import SHAPES, _bench, _bench_graph, _dense_runner, skip_qkv
from attnpatch.bench.selections import random_block_selection, random_page_selection
from attnpatch.methods.prefill.blasst import lambda_bound
from attnpatch.sparsity import BlockSelection


def variants(out: Path, shapes: tuple[str, ...] = ("llama3-8b", "smollm2"), length: int = 32768) -> None:
    """Loop variants of the block-sparse kernel (0: index loaded in place, 1: index prefetched one
    ahead, 2: 1 + TMA loads of K/V) at density 1 and 0.1."""
    rows = []
    configs = {0: ((8, 3),), 1: ((8, 3),), 2: ((8, 2), (8, 3), (8, 4), (4, 3))}
    for shape in shapes:
        q, k, v = _layer_qkv(shape, length)
        hq = q.shape[1]
        cudnn = _bench(_dense_runner("cudnn", q, k, v)[0])
        for density in (1.0, 0.1):
            sel = random_block_selection(1, hq, length, 128, density, device="cuda")
            for variant, settings in configs.items():
                for warps, stages in settings:
                    try:
                        ms = _bench(lambda q=q, k=k, v=v, sel=sel, var=variant, w=warps, st=stages:
                                    block_sparse_attention_triton(q, k, v, sel, variant=var, num_warps=w,
                                                                  num_stages=st))
                    except Exception as e:  # noqa: BLE001
                        ms = float("nan")
                        print(f"variant {variant}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                    rows.append({"shape": shape, "length": length, "density": density, "variant": variant,
                                 "warps": warps, "stages": stages, "ms": ms, "cudnn_ms": cudnn})
                    print(f"{shape} d={density} variant={variant} w{warps} s{stages}: {ms:.3f} ms "
                          f"({density * cudnn / ms:.2f} of cuDNN per kept block)", flush=True)
    _write(out, "variants.json", rows)


def _decode_layers(batch: int, length: int, layers: int):
    """A bf16 query and `layers` distinct KV caches with their own random selections of 1/16 of the
    128-token pages (llama3-8b layer): the inputs of one graphed decode step."""
    hq, hkv, d = SHAPES["llama3-8b"]
    q = torch.randn(batch, hq, 1, d, device="cuda", dtype=torch.bfloat16)
    caches = [tuple(torch.randn(batch, hkv, length, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
              for _ in range(layers)]
    sels = [random_page_selection(batch, hkv, length, 128, 1 / 16, device="cuda") for _ in range(layers)]
    return q, caches, sels


def _sparse_step_ms(q, caches, sels, **kwargs) -> float:
    """Milliseconds per layer of `sparse_decode_attention` over every cache, captured in one graph."""

    def step():
        for (k, v), sel in zip(caches, sels, strict=True):
            sparse_decode_attention(q, k, v, sel, **kwargs)

    return _bench_graph(step) / len(caches)


def decode_step(out: Path, length: int = 131072, layers: int = 8) -> None:
    """Sparse decode over 1/16 of the pages as it runs in a served model: `layers` calls on distinct
    KV caches captured in one CUDA graph (a decode step), time per layer, next to dense SDPA the
    same way and to one call per graph (which adds the graph launch to every call)."""
    rows = []
    tiny = torch.zeros(1, device="cuda")
    floor = _bench_graph(lambda: tiny.add_(1))
    print(f"one-kernel graph (harness floor): {floor * 1000:.1f} us", flush=True)
    for batch in (1, 4):
        q, caches, sels = _decode_layers(batch, length, layers)

        def dense_step(q=q, caches=caches):
            for k, v in caches:
                torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)

        k0, v0 = caches[0]
        row = {"B": batch, "L": length, "layers": layers, "floor_ms": floor,
               "sdpa_step_ms": _bench_graph(dense_step) / layers,
               "sparse_step_ms": _sparse_step_ms(q, caches, sels),
               "sdpa_call_ms": _bench_graph(lambda q=q, k=k0, v=v0: torch.nn.functional.scaled_dot_product_attention(
                   q, k, v, enable_gqa=True)),
               "sparse_call_ms": _bench_graph(lambda q=q, k=k0, v=v0, s=sels[0]: sparse_decode_attention(q, k, v, s))}
        rows.append(row)
        print(f"decode B={batch} per layer in a {layers}-layer graph: sparse {row['sparse_step_ms'] * 1000:.1f} us, "
              f"sdpa {row['sdpa_step_ms'] * 1000:.1f} us ({row['sdpa_step_ms'] / row['sparse_step_ms']:.2f}x); "
              f"one call per graph: {row['sparse_call_ms'] * 1000:.1f} vs {row['sdpa_call_ms'] * 1000:.1f} us "
              f"({row['sdpa_call_ms'] / row['sparse_call_ms']:.2f}x)", flush=True)
    _write(out, "decode_step.json", rows)


def decode_tune(out: Path, length: int = 131072, layers: int = 8) -> None:
    """Warps × pipeline stages × splits of the decode split kernel, timed per layer inside an
    `layers`-layer CUDA graph (as `decode_step`), 1/16 of 128-token pages, llama3-8b layer."""
    import attnpatch.backends.triton.decode as td

    default = td._launch_config
    rows = []
    try:
        for batch in (1, 4):
            q, caches, sels = _decode_layers(batch, length, layers)
            for warps, stages, splits in itertools.product((2, 4, 8), (1, 2, 3, 4), (None, 16, 64)):
                td._launch_config = lambda *_, w=warps, s=stages: (w, s)
                try:
                    ms = _sparse_step_ms(q, caches, sels, num_splits=splits)
                except Exception as e:  # noqa: BLE001  (e.g. out of shared memory)
                    ms = float("nan")
                    print(f"w{warps} s{stages}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                rows.append({"B": batch, "warps": warps, "stages": stages, "splits": splits, "ms": ms})
                print(f"decode tune B={batch} w{warps} s{stages} splits={splits}: {ms * 1000:.1f} us", flush=True)
    finally:
        td._launch_config = default
    _write(out, "decode_tune.json", rows)


def host_overhead(out: Path) -> None:
    """Mask-free prefix per list on the host (torch ops) vs inside the kernel, llama3-8b layer."""
    hq = SHAPES["llama3-8b"][0]
    rows = []
    for length in (8192, 32768):
        q, k, v = _layer_qkv("llama3-8b", length)
        cudnn = _bench(_dense_runner("cudnn", q, k, v)[0])
        for density in (1.0, 0.1, 0.02):
            sel = (BlockSelection.causal(1, hq, length, length, 128, 128, "cuda") if density >= 1 else
                   random_block_selection(1, hq, length, 128, density, device="cuda"))
            for in_kernel in (False, True):
                ms = _bench(lambda q=q, k=k, v=v, sel=sel, f=in_kernel: block_sparse_attention_triton(
                    q, k, v, sel, full_in_kernel=f))
                rows.append({"length": length, "density": density, "in_kernel": in_kernel, "ms": ms, "cudnn_ms": cudnn})
                print(f"L={length} d={density} prefix in kernel={in_kernel}: {ms:.3f} ms "
                      f"({density * cudnn / ms:.2f} of cuDNN per kept block)", flush=True)
    _write(out, "host_overhead.json", rows)


def _layer_qkv(shape: str, length: int):
    """Random bf16 Q/K/V `[1, H, L, D]` of one of the benchmark's layer shapes."""
    hq, hkv, d = SHAPES[shape]
    return tuple(torch.randn(1, h, length, d, device="cuda", dtype=torch.bfloat16) for h in (hq, hkv, hkv))


def _write(out: Path, name: str, rows: list[dict]) -> None:
    import triton

    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    (out / name).write_text(json.dumps({**meta, "rows": rows}, indent=1))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="bench/results")
    p.add_argument("--variants", action="store_true", help="only the kernel loop variants")
    p.add_argument("--decode-step", action="store_true", help="only decode: per layer inside a graphed step")
    p.add_argument("--decode-tune", action="store_true", help="only decode: warps × stages × splits, graphed step")
    p.add_argument("--host-overhead", action="store_true", help="only the mask-free prefix: host vs kernel")
    args = p.parse_args()
    only = [f for flag, f in ((args.variants, variants), (args.decode_step, decode_step),
                              (args.decode_tune, decode_tune), (args.host_overhead, host_overhead)) if flag]
    if only:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        for part in only:
            part(Path(args.out))
        return 0
    res = {"gpu": torch.cuda.get_device_name(), "prefill": [], "skip": [], "decode": []}
    hq, hkv, d = SHAPES["llama3-8b"]
    L = 32768
    q, k, v = (torch.randn(1, h, L, d, device="cuda", dtype=torch.bfloat16) for h in (hq, hkv, hkv))
    cudnn = _bench(_dense_runner("cudnn", q, k, v)[0])
    for density in (1.0, 0.1):
        sel = random_block_selection(1, hq, L, 128, density, device="cuda")
        for pre in (False, True):
            ms = _bench(lambda sel=sel, pre=pre: block_sparse_attention_triton(q, k, v, sel, prescale_q=pre))
            res["prefill"].append({"density": density, "prescale_q": pre, "ms": ms, "cudnn_ms": cudnn})
            print(f"prefill d={density} prescale={pre}: {ms:.3f} ms (cuDNN {cudnn:.3f})", flush=True)
    q, k, v = skip_qkv(1, hq, hkv, L, d, sink=24.0)
    sel = BlockSelection.causal(1, hq, L, L, 128, 128, "cuda")
    for pre in (False, True):
        plain = _bench(lambda pre=pre: block_sparse_attention_triton(q, k, v, sel, prescale_q=pre))
        for lam in (0.0, 0.1, 0.4):
            bound = lambda_bound(lam, d ** -0.5)  # ln λ on scaled scores; λ = 0 never skips
            _, (vis, skp) = block_sparse_attention_triton(q, k, v, sel, skip_bound=bound, count_tiles=True)
            ms = _bench(lambda bound=bound, pre=pre: block_sparse_attention_triton(
                q, k, v, sel, skip_bound=bound, prescale_q=pre))
            frac = float(skp) / float(vis)
            res["skip"].append({"prescale_q": pre, "lambda": lam, "skipped": frac, "ms": ms, "plain_ms": plain})
            print(f"skip prescale={pre} λ={lam}: skipped {frac:.3f} {ms:.3f} ms vs plain {plain:.3f} "
                  f"({plain / ms:.2f}x)", flush=True)
    for B in (1, 4):
        L = 131072
        q = torch.randn(B, hq, 1, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(B, hkv, L, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(B, hkv, L, d, device="cuda", dtype=torch.bfloat16)
        dense = _bench_graph(
            lambda q=q, k=k, v=v: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True))
        for page in (64, 128):
            sel = random_page_selection(B, hkv, L, page, 1 / 16, device="cuda")
            for tile in (page, 2 * page) if page == 64 else (page,):
                for splits in (None, 4, 8, 16, 32, 64):
                    try:
                        ms = _bench_graph(lambda q=q, k=k, v=v, sel=sel, t=tile, s=splits: sparse_decode_attention(
                            q, k, v, sel, tile_size=t, num_splits=s))
                    except Exception as e:  # noqa: BLE001
                        ms = float("nan")
                        print(type(e).__name__, str(e)[:100])
                    res["decode"].append({"B": B, "page": page, "tile": tile, "splits": splits, "ms": ms,
                                          "sdpa_ms": dense})
                    print(f"decode B={B} page={page} tile={tile} splits={splits}: {ms:.4f} ms graph "
                          f"(sdpa {dense:.4f}, {dense / ms:.2f}x)", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablate.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
