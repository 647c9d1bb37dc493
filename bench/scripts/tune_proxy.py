"""ProxyAttn's fused block-statistics kernel: rows per tile × warps × stages at one length, against the
torch path, on the planted synthetic inputs of `attnpatch.bench.methods` (block 128, 16 sampled rows).

    python bench/scripts/tune_proxy.py --out DIR --shape llama3-8b --length 131072
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
from tune_antidiagonal import timed  # this folder's timing: CUDA events after one warm-up call

from attnpatch.bench.methods import SHAPES
from attnpatch.bench.synthetic import planted_qkv
from attnpatch.estimators import proxy_triton
from attnpatch.estimators.proxy import proxy_scores_torch, sampled_rows
from attnpatch.sparsity import KeyBounds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--length", type=int, default=131072)
    p.add_argument("--tiles", default="64,128")
    p.add_argument("--warps", default="4,8")
    p.add_argument("--stages", default="2,3,4")
    p.add_argument("--torch-path", action="store_true", help="also time the torch path")
    a = p.parse_args()
    hq, hkv, d = SHAPES[a.shape]
    q, k, _ = planted_qkv(1, hq, hkv, a.length, d, device="cuda", dtype=torch.bfloat16)
    bounds, scale, block, sample = KeyBounds(), d ** -0.5, 128, 16
    rows = sampled_rows(a.length, block, sample, q.device)
    results = []
    if a.torch_path:
        results.append({"config": "torch path", "ms": timed(lambda: proxy_scores_torch(q, k, bounds, scale, block,
                                                                                       sample), 2)})
    for tile, warps, stages in itertools.product(*(map(int, x.split(",")) for x in (a.tiles, a.warps, a.stages))):
        try:
            ms = timed(lambda t=tile, w=warps, s=stages: proxy_triton.proxy_scores_triton(
                q, k, bounds, scale, block, rows, tile_rows=t, launch=(w, s)), 5)
        except Exception as e:  # noqa: BLE001  (a config that does not fit is a result)
            results.append({"config": f"{tile} rows, {warps} warps, {stages} stages", "error": str(e)[:200]})
            continue
        results.append({"config": f"{tile} rows, {warps} warps, {stages} stages", "ms": ms})
        print(results[-1], flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tune_proxy.json").write_text(json.dumps({"shape": a.shape, "length": a.length, "device":
                                                     torch.cuda.get_device_name(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
