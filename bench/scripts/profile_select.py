"""Where a prefill method's `select` (estimate + selection) spends its GPU time: the top kernels of
torch.profiler over a few calls on the planted synthetic inputs of `attnpatch.bench.methods`.

    python bench/scripts/profile_select.py --out DIR --shape llama3-8b --length 131072 --methods proxyattn flexprefill
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from attnpatch.bench.methods import SHAPES
from attnpatch.bench.synthetic import planted_qkv
from attnpatch.methods.base import PrefillContext
from attnpatch.registry import method_infos
from attnpatch.sparsity import KeyBounds
from attnpatch.spec import PatchSpec


def profile(text: str, q, k, calls: int, top: int) -> dict:
    spec = PatchSpec.parse(text)
    info = next(m for m in method_infos("prefill") if m.name == spec.method)
    method = info.build(spec.prefill_options, q.shape[1])
    ctx = PrefillContext(0, q.shape[-1] ** -0.5, KeyBounds(), None)
    method.select(q, k, ctx)  # warm-up: compilation, autotuning
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        start.record()
        for _ in range(calls):
            method.select(q, k, ctx)
        end.record()
        torch.cuda.synchronize()
    kernels = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0:
            kernels.append({"kernel": e.key[:120], "ms_per_call": t / 1e3 / calls,
                            "launches_per_call": e.count / calls})
    kernels.sort(key=lambda r: -r["ms_per_call"])
    return {"spec": text, "select_ms": start.elapsed_time(end) / calls,
            "kernels_ms": sum(r["ms_per_call"] for r in kernels), "top": kernels[:top]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--length", type=int, default=131072)
    p.add_argument("--methods", nargs="+", default=["proxyattn"])
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--top", type=int, default=15)
    a = p.parse_args()
    hq, hkv, d = SHAPES[a.shape]
    q, k, _ = planted_qkv(1, hq, hkv, a.length, d, device="cuda", dtype=torch.bfloat16)
    rows = [profile(text, q, k, a.calls, a.top) for text in a.methods]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile_select.json").write_text(json.dumps({"shape": a.shape, "length": a.length, "device":
                                                         torch.cuda.get_device_name(), "rows": rows}, indent=1))
    for r in rows:
        print(f"\n{r['spec']}: select {r['select_ms']:.2f} ms, kernels {r['kernels_ms']:.2f} ms")
        for kr in r["top"]:
            print(f"  {kr['ms_per_call']:8.3f} ms  x{kr['launches_per_call']:.0f}  {kr['kernel']}")


if __name__ == "__main__":
    main()
