"""Tune the block-sparse kernel's launch settings on the GPU: sub-tiles × warps × stages, per head dim.

`python -m attnpatch.bench.tune --out DIR` times every setting at 32K keys for density 1 and 0.1
and writes tune.json plus the best setting per (head dim, density), with cuDNN in the same run.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch

from attnpatch.backends.triton.block_sparse import block_sparse_attention_triton
from attnpatch.bench.kernels import SHAPES, _bench, _dense_runner
from attnpatch.bench.selections import random_block_selection


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="bench/results")
    p.add_argument("--length", type=int, default=32768)
    p.add_argument("--shapes", default="llama3-8b,smollm2")
    p.add_argument("--variant", type=int, default=None, help="kernel loop variant (default: the kernel's choice)")
    p.add_argument("--subtiles", default="128x128,128x64,64x128,64x64")
    p.add_argument("--warps", default="4,8")
    p.add_argument("--stages", default="2,3,4")
    args = p.parse_args()
    results = []
    for shape in args.shapes.split(","):
        hq, hkv, d = SHAPES[shape]
        q = torch.randn(1, hq, args.length, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, hkv, args.length, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, hkv, args.length, d, device="cuda", dtype=torch.bfloat16)
        cudnn = _bench(_dense_runner("cudnn", q, k, v)[0])
        print(f"{shape} cudnn {cudnn:.3f} ms", flush=True)
        for density in (1.0, 0.1):
            sel = random_block_selection(1, hq, args.length, 128, density, device="cuda")
            subtiles = [tuple(int(x) for x in t.split("x")) for t in args.subtiles.split(",")]
            grid = itertools.product(subtiles, _ints(args.warps), _ints(args.stages))
            for (sm, sn), warps, stages in grid:
                try:
                    ms = _bench(lambda q=q, k=k, v=v, sel=sel, sm=sm, sn=sn, w=warps, st=stages:
                                block_sparse_attention_triton(q, k, v, sel, sub_m=sm, sub_n=sn, num_warps=w,
                                                              num_stages=st, variant=args.variant),
                                rep_ms=100)
                except Exception as e:  # noqa: BLE001  (out of shared memory etc.)
                    ms = float("nan")
                    print(f"  {sm}x{sn} w{warps} s{stages}: {type(e).__name__}", flush=True)
                results.append({"shape": shape, "d": d, "variant": args.variant, "density": density, "sub_m": sm,
                                "sub_n": sn, "warps": warps, "stages": stages, "ms": ms, "cudnn_ms": cudnn})
                print(f"  {shape} dens={density} {sm}x{sn} w{warps} s{stages}: {ms:.3f} ms "
                      f"({density * cudnn / ms:.2f} of cuDNN per kept block)", flush=True)
    best = {}
    for r in results:
        key = f"{r['shape']} d={r['density']}"
        if r["ms"] == r["ms"] and (key not in best or r["ms"] < best[key]["ms"]):
            best[key] = r
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "tune.json" if args.variant is None else f"tune_variant{args.variant}.json"
    (out / name).write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "results": results, "best": best},
                                              indent=1))
    for key, r in best.items():
        print(f"BEST {key}: {r['sub_m']}x{r['sub_n']} w{r['warps']} s{r['stages']} {r['ms']:.3f} ms "
              f"(cuDNN {r['cudnn_ms']:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
