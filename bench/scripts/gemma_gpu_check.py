"""Where does Gemma-3-270m's long-context perplexity break on the GPU? Perplexity of one Austen window at
several lengths under each SDPA kernel, eager attention, float32, and attnpatch's dense patch.

    python bench/scripts/gemma_gpu_check.py --out OUT.json [--lengths 512,2048,8192,16384]

Writes `{config: {length: perplexity or error}}`; the CPU reference (float32 / bf16 SDPA) is 26.5 at 16K.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import attnpatch
from attnpatch.eval.perplexity import window_perplexity
from attnpatch.eval.texts import austen
from attnpatch.models import load

KERNELS = {"sdpa-math": SDPBackend.MATH, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
           "sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--lengths", default="512,2048,8192,16384")
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    text = austen("emma")
    results: dict[str, dict] = {}

    def run(name: str, model, tok, ctx_factory=contextlib.nullcontext, max_len: int | None = None) -> None:
        results[name] = {}
        for n in lengths:
            if max_len is not None and n > max_len:
                continue
            t0 = time.time()
            try:
                with ctx_factory():
                    ppl = window_perplexity(model, tok, text, n)
                results[name][n] = {"ppl": round(ppl, 3), "s": round(time.time() - t0, 2)}
            except Exception as e:  # noqa: BLE001 - a kernel that refuses the input is a result here
                results[name][n] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            print(name, n, results[name][n], flush=True)

    model, tok = load(args.model, dtype=torch.bfloat16, device="cuda")
    results["_versions"] = {"torch": torch.__version__, "cudnn": torch.backends.cudnn.version()}
    run("sdpa-default", model, tok)
    for name, kernel in KERNELS.items():
        run(name, model, tok, lambda k=kernel: sdpa_kernel([k]))
    for backend in ("auto", "flash", "triton", "reference"):
        with attnpatch.patch_model(model, "dense", backend=backend):
            run(f"attnpatch-dense-{backend}", model, tok)
    model.set_attn_implementation("eager")
    run("eager", model, tok, max_len=8192)
    del model
    model32, tok = load(args.model, dtype=torch.float32, device="cuda")
    run("sdpa-default-fp32", model32, tok)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
