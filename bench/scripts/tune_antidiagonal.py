"""Tile / warp / stage sweep of XAttention's fused antidiagonal estimate on a CUDA GPU, next to the torch
path, on random `[1, H, L, D]` inputs (llama3-8b layer: 32 q / 8 kv heads, d 128; stride 8, block 128).

    python bench/scripts/tune_antidiagonal.py --lengths 32768,131072 --out DIR
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
from pathlib import Path

import torch

from attnpatch.estimators.antidiagonal import antidiagonal_block_scores_torch
from attnpatch.estimators.antidiagonal_triton import antidiagonal_block_scores_triton
from attnpatch.sparsity import KeyBounds


def timed(fn, repeats: int) -> float:
    """Milliseconds per call (CUDA events, after one warm-up call)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="32768,131072")
    p.add_argument("--heads", default="32,8,128", help="q heads, kv heads, head dim")
    p.add_argument("--stride", type=int, default=8)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--tiles", default="64x64,128x64,64x128,128x128")
    p.add_argument("--warps", default="4,8")
    p.add_argument("--stages", default="1,2,3")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    hq, hkv, d = (int(x) for x in args.heads.split(","))
    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(1, hq, length, d, device="cuda", dtype=torch.bfloat16, generator=g)
        k = torch.randn(1, hkv, length, d, device="cuda", dtype=torch.bfloat16, generator=g)
        scale, bounds = 1.0 / math.sqrt(d), KeyBounds()
        repeats = 3 if length > 65536 else 10
        ref = antidiagonal_block_scores_torch(q, k, scale, bounds, args.block, args.stride)
        torch_ms = timed(functools.partial(antidiagonal_block_scores_torch, q, k, scale, bounds, args.block,
                                           args.stride), repeats)
        rows.append({"length": length, "path": "torch", "ms": torch_ms})
        print(f"L={length} torch {torch_ms:.2f} ms", flush=True)
        for tile, warps, stages in itertools.product(args.tiles.split(","), args.warps.split(","),
                                                    args.stages.split(",")):
            tg, tk = (int(x) for x in tile.split("x"))
            cfg = {"tiles": (tg, tk), "launch": (int(warps), int(stages))}
            try:
                run = functools.partial(antidiagonal_block_scores_triton, q, k, scale, bounds, args.block,
                                        args.stride, **cfg)
                err = float((run() - ref).abs().max())
                ms = timed(run, repeats)
            except Exception as e:  # noqa: BLE001 - a config the compiler rejects (shared memory) is a row too
                rows.append({"length": length, "path": "triton", "tiles": tile, "warps": int(warps),
                             "stages": int(stages), "error": f"{type(e).__name__}: {str(e)[:120]}"})
                print(f"L={length} {tile} w{warps} s{stages}: {type(e).__name__}", flush=True)
                continue
            rows.append({"length": length, "path": "triton", "tiles": tile, "warps": int(warps),
                         "stages": int(stages), "ms": ms, "max_abs_diff_vs_torch": err})
            print(f"L={length} {tile} w{warps} s{stages}: {ms:.2f} ms ({torch_ms / ms:.2f}x torch) diff {err:.1e}",
                  flush=True)
        del q, k, ref
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "heads": args.heads,
           "stride": args.stride, "block": args.block, "dtype": "bfloat16"}
    (out / "tune_antidiagonal.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
