"""GPU correctness: every fast kernel against the exact PyTorch reference in float32, bf16 and fp16 inputs.

`python -m attnpatch.bench.check` on a CUDA machine prints one line per case with the relative error
‖out − ref‖ / ‖ref‖ and exits non-zero if any case exceeds its tolerance (bf16 2e-2, fp16 5e-3).
"""

from __future__ import annotations

import sys

import torch

from attnpatch.backends import reference
from attnpatch.bench.selections import random_block_selection, random_page_selection
from attnpatch.sparsity import BlockSelection, SkipRule, TokenSelection, num_blocks

TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3}


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-30))


def _qkv(b, hq, hkv, lq, lk, d, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, hq, lq, d, device="cuda", generator=g).to(dtype)
    k = torch.randn(b, hkv, lk, d, device="cuda", generator=g).to(dtype)
    v = torch.randn(b, hkv, lk, d, device="cuda", generator=g).to(dtype)
    return q, k, v


DTYPES = (torch.bfloat16, torch.float16)


def block_sparse_cases():
    from attnpatch.backends.triton.block_sparse import block_sparse_attention_triton

    for dtype in DTYPES:
        for d, block, (lq, lk) in ((128, 128, (3000, 3000)), (64, 64, (1500, 2100)), (128, 64, (777, 777))):
            q, k, v = _qkv(2, 8, 2, lq, lk, d, dtype)
            for density in (1.0, 0.3):
                sel = random_block_selection(2, 8, lk, block, density, device="cuda")
                if lq != lk:  # chunked prefill: keep the last lq rows' selection shape right
                    from attnpatch.sparsity import causal_block_limit

                    r, c = num_blocks(lq, block), num_blocks(lk, block)
                    lim = causal_block_limit(lq, lk, block, block, "cuda")
                    full = (torch.arange(c, device="cuda") < lim.view(r, 1)).view(1, 1, r, c).expand(2, 8, r, c)
                    sel = BlockSelection.from_block_mask(full, block, block, lq, lk)
                ref = reference.block_sparse_attention(q.float(), k.float(), v.float(), sel)
                out = block_sparse_attention_triton(q, k, v, sel)
                yield f"block-sparse {dtype} D={d} blk={block} {lq}x{lk} dens={density}", rel(out, ref), TOL[dtype]
                for variant in (1, 2):  # both loops, with the host-computed mask-free prefix
                    out = block_sparse_attention_triton(q, k, v, sel, variant=variant, full_in_kernel=False)
                    yield (f"block-sparse {dtype} D={d} blk={block} {lq}x{lk} dens={density} variant={variant} "
                           "prefix on host", rel(out, ref), TOL[dtype])


def skip_cases():
    from attnpatch.backends.triton.block_sparse import block_sparse_attention_triton

    for dtype in DTYPES:
        # skip mode: the kernel's own tiled oracle decides the same tiles on the same inputs
        from attnpatch.backends.triton.block_sparse import block_sparse_attention_tiled_reference

        q, k, v = _qkv(1, 8, 2, 2048, 2048, 128, dtype, seed=3)
        k[:, :, 0] = q.float().mean((1, 2)).to(dtype) * 8
        sel = BlockSelection.causal(1, 8, 2048, 2048, 128, 128, "cuda")
        for lam in (1e-4, 1e-2):
            out, (vis, skp) = block_sparse_attention_triton(q, k, v, sel, skip_threshold=lam, skip_convention="scaled",
                                                            count_tiles=True)
            ref = block_sparse_attention_tiled_reference(q.float(), k.float(), v.float(), sel, skip_threshold=lam,
                                                         skip_convention="scaled")
            yield f"skip {dtype} λ={lam} skipped {float(skp) / float(vis):.2f}", rel(out, ref), TOL[dtype]
        # reference-executor skip semantics vs the kernel (same rule, float32 reference)
        rsel = BlockSelection.causal(1, 8, 2048, 2048, 128, 128, "cuda", SkipRule(float(torch.tensor(1e-2).log())))
        ref = reference.block_sparse_attention(q.float(), k.float(), v.float(), rsel)
        out = block_sparse_attention_triton(q, k, v, sel, skip_threshold=1e-2, skip_convention="scaled")
        yield f"skip {dtype} kernel vs reference executor", rel(out, ref), 5 * TOL[dtype]


def gather_cases():
    from attnpatch.backends.triton.gather import token_gather_attention_triton

    for dtype in DTYPES:
        q, k, v = _qkv(1, 8, 2, 1000, 3000, 128, dtype, seed=4)
        r = num_blocks(1000, 64)
        pos = torch.randperm(3000, device="cuda")[:640].sort().values.to(torch.int32)
        sel = TokenSelection(pos.expand(1, 8, r, 640), torch.full((1, 8, r), 640, dtype=torch.int32, device="cuda"),
                             64, 1000, 3000)
        ref = reference.token_gather_attention(q.float(), k.float(), v.float(), sel)
        yield f"token-gather {dtype}", rel(token_gather_attention_triton(q, k, v, sel), ref), TOL[dtype]


def decode_cases():
    from attnpatch.backends.triton.decode import sparse_decode_attention

    for dtype in DTYPES:
        for d in (64, 128):
            q, k, v = _qkv(3, 32, 8, 1, 50_000, d, dtype, seed=5)
            for frac in (1.0, 1 / 16):
                sel = random_page_selection(3, 8, 50_000, 64, frac, device="cuda")
                ref = reference.paged_decode_attention(q.float(), k.float(), v.float(), sel)
                yield f"decode {dtype} D={d} frac={frac:.3f}", rel(sparse_decode_attention(q, k, v, sel), ref), TOL[dtype]


def flex_cases():
    from attnpatch.backends.flex import flex_block_sparse_attention

    for dtype in DTYPES:
        q, k, v = _qkv(1, 8, 2, 4096, 4096, 128, dtype, seed=6)
        sel = random_block_selection(1, 8, 4096, 128, 0.2, device="cuda")
        ref = reference.block_sparse_attention(q.float(), k.float(), v.float(), sel)
        yield f"flex {dtype}", rel(flex_block_sparse_attention(q, k, v, sel), ref), TOL[dtype]


def model_case():
    """A tiny Llama patched with a_shape / blasst: triton backend vs reference backend on the GPU."""
    import attnpatch
    from attnpatch.testing import tiny_model

    model = tiny_model("llama", head_dim=64, num_attention_heads=4, hidden_size=256).cuda().to(torch.bfloat16)
    ids = torch.randint(3, 256, (2, 1000), device="cuda")
    for method, opts in (("a_shape", {"local_blocks": 2}), ("blasst", {"a": 200.0})):
        outs = {}
        for backend in ("reference", "triton"):
            with torch.no_grad(), attnpatch.patch_model(model, method=method, backend=backend, **opts) as patch:
                outs[backend] = model(ids).logits.float()
                stats = patch.stats().to_dict()
                fallbacks = {k: v for layer in stats["layers"] for k, v in layer["executor_fallbacks"].items()}
        yield f"model {method} triton vs reference (fallbacks {fallbacks})", rel(outs["triton"], outs["reference"]), 2e-2


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    bad = 0
    for group in (block_sparse_cases, skip_cases, gather_cases, decode_cases, flex_cases, model_case):
        try:
            for name, err, tol in group():
                ok = err <= tol
                bad += not ok
                print(f"{'ok ' if ok else 'BAD'} {err:.2e} (tol {tol:.0e})  {name}", flush=True)
        except Exception as e:  # noqa: BLE001  (report and go on with the other kernels)
            bad += 1
            print(f"ERR {group.__name__}: {type(e).__name__}: {str(e)[:400]}", flush=True)
    print(f"{bad} failing case(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
