"""flash-attn-4 backend on a GPU: correctness against the float32 reference, then timings.

`python -m attnpatch.bench.flash_check --out DIR` (H200 / SM90 or SM100, flash-attn-4 installed):

1. checks `flash_prefill` against `attnpatch.backends.reference.block_sparse_attention` (float32) on
   small cases (dense, sparse, GQA, head-shared selection, chunked prefill, left padding, sliding
   window, 64-blocks), in both masking modes, and prints ‖out − ref‖/‖ref‖ and the LSE error; that the
   Triton list builder equals the PyTorch one; and whether `selection_to_block_sparse` /
   `flash_prefill` synchronise with the host;
2. times (median ms, triton's `do_bench`) for the Llama-3.1-8B (32/8/128) and SmolLM2 (9/3/64)
   layers, bf16, B=1: SDPA cuDNN dense causal, fa4 dense causal, fa4 block-sparse through
   `flash_prefill` at several densities (`random_block_selection`, block 128; lists converted
   beforehand, so "fa4 ms" is the kernel call) in both masking modes, and the conversion alone
   (`selection_to_block_sparse`, the one-launch Triton path; the PyTorch path's time is recorded
   too) as a share of that call. "per kept block" = density × cuDNN ms /
   fa4 ms (> 1: a kept block costs less than a cuDNN block).

Writes DIR/flash_check.json (rewritten after every measurement, so a time limit keeps what was done)
and prints a table. `--budget-s` stops starting new timings past that many seconds.
"""

from __future__ import annotations

import json
import math
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

from attnpatch.backends.flash import (
    flash_prefill,
    flash_unavailable_reason,
    selection_to_block_sparse,
    unsupported_reason,
)
from attnpatch.backends.reference import block_sparse_attention
from attnpatch.bench.selections import bernoulli_block_selection, random_block_selection
from attnpatch.sparsity import BlockSelection

SHAPES = {"llama3.1-8b": (32, 8, 128), "smollm2": (9, 3, 64)}
LENGTHS = (8192, 32768, 131072)
DENSITIES = (1.0, 0.5, 0.1, 0.02)
MODES = ("mask_mod", "causal")
TOL = 2e-2


def _rel(out, ref) -> float:
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-30))


def _lse_err(lse, ref) -> float:
    if not torch.equal(torch.isinf(lse), torch.isinf(ref)):
        return float("inf")
    fin = torch.isfinite(ref)
    return float((lse[fin] - ref[fin]).abs().max()) if fin.any() else 0.0


def _qkv(b, hq, hkv, lq, lk, d, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return tuple(torch.randn(b, h, n, d, device="cuda", generator=g).to(torch.bfloat16)
                 for h, n in ((hq, lq), (hkv, lk), (hkv, lk)))


def _random_selection(b, h, lq, lk, block, density, seed, shared=False):
    """Random causal selection for any (lq, lk), keeping block 0 and the diagonal."""
    return bernoulli_block_selection(b, h, lq, lk, block, block, density, seed, shared, keep_first=True, device="cuda")


def _visibility(b, lq, lk, key_start, window):
    p = (torch.arange(lq, device="cuda") + lk - lq).view(lq, 1)
    j = torch.arange(lk, device="cuda").view(1, lk)
    ok = (j <= p).expand(b, 1, lq, lk).clone()
    if key_start is not None:
        ok &= j.view(1, 1, 1, lk) >= key_start.view(-1, 1, 1, 1)
    if window is not None:
        ok &= (p - j) < window
    return ok


# name, b, hq, hkv, lq, lk, d, block (None: dense), window, key_start, shared selection
CHECKS = [
    ("dense", 1, 8, 2, 1000, 1000, 128, None, None, None, False),
    ("dense chunked", 2, 4, 4, 300, 1100, 64, None, None, None, False),
    ("dense window", 1, 4, 1, 900, 900, 128, None, 200, None, False),
    ("dense padding", 2, 8, 2, 700, 700, 128, None, None, [0, 130], False),
    ("dense padding+window d64", 2, 9, 3, 700, 700, 64, None, 100, [3, 250], False),
    ("sparse gqa", 2, 8, 2, 1000, 1000, 128, 128, None, None, False),
    ("sparse shared d64 G3", 1, 9, 3, 1100, 1100, 64, 128, None, None, True),
    ("sparse chunked", 1, 8, 2, 333, 1500, 128, 128, None, None, False),
    ("sparse padding", 2, 8, 2, 900, 900, 128, 128, None, [77, 256], False),
    ("sparse window", 1, 8, 2, 1200, 1200, 128, 128, 300, None, False),
    ("sparse window+padding chunked shared", 2, 4, 2, 600, 1000, 128, 128, 333, [10, 500], True),
    ("sparse block 64", 1, 4, 2, 700, 700, 128, 64, None, None, False),
    ("sparse block 64 d64 shared", 1, 9, 3, 700, 700, 64, 64, 100, None, True),
]


def run_checks(results: list) -> bool:
    ok = True
    for name, b, hq, hkv, lq, lk, d, block, window, ks, shared in CHECKS:
        q, k, v = _qkv(b, hq, hkv, lq, lk, d, seed=len(name))
        key_start = torch.tensor(ks, device="cuda") if ks is not None else None
        scale = 1.0 / math.sqrt(d)
        if block is None:
            sel, ref_sel = None, BlockSelection.causal(b, hq, lq, lk, 64, 64, device="cuda")
        else:
            sel = ref_sel = _random_selection(b, hq, lq, lk, block, 0.4, seed=len(name), shared=shared)
        mask = _visibility(b, lq, lk, key_start, window) if (ks is not None or window is not None) else None
        ref, ref_lse = block_sparse_attention(q.float(), k.float(), v.float(), ref_sel, scale=scale, mask=mask,
                                              return_lse=True)
        modes = MODES if block is not None and ks is None else MODES[:1]
        for mode in modes:
            row = {"case": name, "masking": mode, "shape": [b, hq, hkv, lq, lk, d], "block": block,
                   "window": window, "key_start": ks}
            reason = unsupported_reason(q, k, v, sel, key_start, window, mode)
            if reason is not None:
                row.update(error=f"declined: {reason}", passed=False)
            else:
                try:
                    t0 = time.perf_counter()
                    out, lse = flash_prefill(q, k, v, sel, scale=scale, key_start=key_start, window=window,
                                             return_lse=True, masking=mode)
                    torch.cuda.synchronize()
                    first_s = time.perf_counter() - t0
                    rel, lse_err = _rel(out, ref), _lse_err(lse, ref_lse)
                    row.update(rel=rel, lse_max_abs=lse_err, first_call_s=round(first_s, 2),
                               passed=rel < TOL and lse_err < 5e-2)
                except Exception as e:  # noqa: BLE001  (report and go on)
                    torch.cuda.synchronize()
                    row.update(error=f"{type(e).__name__}: {e}"[:500], passed=False)
            ok &= row["passed"]
            results.append(row)
            status = "ok  " if row["passed"] else "FAIL"
            detail = (f"rel {row['rel']:.2e}  lse {row['lse_max_abs']:.2e}  first call {row['first_call_s']} s"
                      if "rel" in row else row["error"])
            print(f"{status} {name:38s} {mode:8s} {detail}", flush=True)
    return ok


def list_checks(results: list) -> bool:
    """The one-launch Triton list builder gives the PyTorch path's tensors exactly."""
    ok = True
    cases = [(2, 8, 1000, 1000, 128, None, None, False), (1, 9, 333, 1500, 128, 300, [7], True),
             (2, 4, 1100, 1100, 64, 77, [0, 200], False), (1, 32, 32768, 32768, 128, None, None, False)]
    for b, h, lq, lk, block, window, ks, shared in cases:
        sel = _random_selection(b, h, lq, lk, block, 0.3, seed=lq, shared=shared)
        key_start = torch.tensor(ks, device="cuda") if ks is not None else None
        got = selection_to_block_sparse(sel, key_start, window, impl="triton")
        want = selection_to_block_sparse(sel, key_start, window, impl="torch")
        same = all(torch.equal(x, y) for x, y in zip(got[:4], want[:4], strict=True))
        ok &= same
        name = f"lists B={b} H={h} {lq}x{lk} blk={block} window={window} key_start={ks} shared={shared}"
        results.append({"case": name, "triton_equals_torch": same})
        print(f"{'ok  ' if same else 'FAIL'} {name}", flush=True)
    return ok


def sync_checks(results: list) -> None:
    """Does the conversion, or the whole call, synchronise with the host? (after a warm call)"""
    q, k, v = _qkv(1, 32, 8, 8192, 8192, 128)
    sel = random_block_selection(1, 32, 8192, 128, 0.1, device="cuda")
    ks = torch.tensor([100], device="cuda")
    calls = {
        "selection_to_block_sparse": lambda: selection_to_block_sparse(sel, ks, 1000),
        "selection_to_block_sparse torch": lambda: selection_to_block_sparse(sel, ks, 1000, impl="torch"),
        "flash_prefill sparse": lambda: flash_prefill(q, k, v, sel, scale=0.088),
        "flash_prefill sparse padded": lambda: flash_prefill(q, k, v, sel, scale=0.088, key_start=ks, window=1000),
        "flash_prefill dense": lambda: flash_prefill(q, k, v, None, scale=0.088),
    }
    for name, fn in calls.items():
        fn()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn()
            verdict = "no host sync"
        except RuntimeError as e:
            verdict = f"syncs: {str(e)[:200]}"
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        results.append({"call": name, "verdict": verdict})
        print(f"sync  {name:38s} {verdict}", flush=True)


def _bench(fn, rep_ms=100) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=rep_ms, return_mode="median"))


def _cudnn_runner(q, k, v):
    from attnpatch.bench.kernels import _dense_runner

    return _dense_runner("cudnn", q, k, v)


def _time_shape(shape: str, length: int, densities, modes, add, over_budget) -> None:
    hq, hkv, d = SHAPES[shape]
    q, k, v = _qkv(1, hq, hkv, length, length, d)
    scale = 1.0 / math.sqrt(d)
    run, note = _cudnn_runner(q, k, v)
    cudnn = _bench(run) if run is not None else math.nan
    add(backend="sdpa-cudnn", density=1.0, ms=cudnn, note=note)
    run = None
    torch.cuda.empty_cache()
    fa_dense = _bench(lambda: flash_prefill(q, k, v, None, scale=scale))
    add(backend="fa4-dense", density=1.0, ms=fa_dense, per_kept_block=cudnn / fa_dense)
    print(f"{shape:12s} {length // 1024:4d}K  cuDNN {cudnn:8.3f} ms  fa4 dense {fa_dense:8.3f} ms", flush=True)
    for dens in densities:
        if over_budget():
            break
        sel = random_block_selection(1, hq, length, 128, dens, device="cuda")
        actual = float(sel.density_per_head().mean())
        bs = selection_to_block_sparse(sel)
        conv = _bench(lambda sel=sel: selection_to_block_sparse(sel))
        conv_torch = _bench(lambda sel=sel: selection_to_block_sparse(sel, impl="torch"))
        for mode in modes:
            reason = unsupported_reason(q, k, v, sel, None, None, mode)
            if reason is not None:
                add(backend=f"fa4-sparse-{mode}", density=dens, ms=math.nan, note=reason)
                continue
            ms = _bench(lambda sel=sel, mode=mode, bs=bs: flash_prefill(q, k, v, sel, scale=scale, masking=mode,
                                                                        block_sparse=bs))
            e2e = _bench(lambda sel=sel, mode=mode: flash_prefill(q, k, v, sel, scale=scale, masking=mode))
            add(backend=f"fa4-sparse-{mode}", density=dens, actual_density=actual, ms=ms, end_to_end_ms=e2e,
                conversion_ms=conv, conversion_share=conv / ms, conversion_torch_ms=conv_torch,
                per_kept_block=actual * cudnn / ms)
            print(f"{shape:12s} {length // 1024:4d}K  dens {dens:5.2f} ({actual:.3f})  {mode:8s} "
                  f"fa4 {ms:8.3f} ms  +conv {e2e:8.3f} ms  conv {conv:.3f} ms ({100 * conv / ms:.1f}%, "
                  f"torch path {conv_torch:.3f} ms)  "
                  f"per kept block {actual * cudnn / ms:.2f}", flush=True)


def run_timings(rows: list, shapes, lengths, densities, modes, t_start, budget_s, checkpoint) -> None:
    def over_budget() -> bool:
        return time.perf_counter() - t_start > budget_s

    for length in lengths:
        for shape in shapes:
            if over_budget():
                print(f"budget reached: skipping {shape} L={length}", flush=True)
                continue

            def add(shape=shape, length=length, **row):
                row.update(shape=shape, length=length)
                rows.append(row)
                checkpoint()

            _time_shape(shape, length, densities, modes, add, over_budget)
            torch.cuda.empty_cache()


def environment(command: str) -> dict:
    def version(pkg):
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    return {
        "gpu": torch.cuda.get_device_name(),
        "capability": ".".join(map(str, torch.cuda.get_device_capability())),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        **{p: version(p) for p in ("flash-attn-4", "nvidia-cutlass-dsl", "quack-kernels", "apache-tvm-ffi", "triton")},
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def table(rows: list) -> str:
    lines = ["| shape | L | backend | density (actual) | ms | +conversion ms | conv share | per kept block |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def f(key, fmt="{:.3f}", r=r):
            val = r.get(key)
            return fmt.format(val) if isinstance(val, float) and not math.isnan(val) else "–"

        dens = f"{r['density']:.2f}" + (f" ({r['actual_density']:.3f})" if "actual_density" in r else "")
        lines.append(f"| {r['shape']} | {r['length'] // 1024}K | {r['backend']} | {dens} | {f('ms')} | "
                     f"{f('end_to_end_ms')} | {f('conversion_share', '{:.1%}')} | {f('per_kept_block', '{:.2f}')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m attnpatch.bench.flash_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/results/flash", help="output folder")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--lengths", default=",".join(str(x) for x in LENGTHS))
    p.add_argument("--densities", default=",".join(str(x) for x in DENSITIES))
    p.add_argument("--modes", default=",".join(MODES), help="masking modes to time")
    p.add_argument("--budget-s", type=float, default=300.0, help="start no timing after this many seconds")
    p.add_argument("--skip-checks", action="store_true")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("flash_check needs a CUDA GPU", file=sys.stderr)
        return 2
    reason = flash_unavailable_reason("cuda")
    if reason is not None:
        print(f"flash-attn-4 unavailable: {reason}", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = "python -m attnpatch.bench.flash_check " + " ".join(argv if argv is not None else sys.argv[1:])
    data = {"environment": environment(command), "checks": [], "lists": [], "sync": [], "timings": []}

    def checkpoint():
        data["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        (out_dir / "flash_check.json").write_text(json.dumps(data, indent=1, allow_nan=True))

    print(json.dumps(data["environment"]), flush=True)
    ok = True
    if not args.skip_checks:
        ok = run_checks(data["checks"])
        ok &= list_checks(data["lists"])
        checkpoint()
        sync_checks(data["sync"])
        checkpoint()
    run_timings(data["timings"], args.shapes.split(","), [int(x) for x in args.lengths.split(",")],
                [float(x) for x in args.densities.split(",")], args.modes.split(","), t_start, args.budget_s,
                checkpoint)
    checkpoint()
    print()
    print(table(data["timings"]))
    print(f"\nchecks {'all passed' if ok else 'FAILED'}; {data['elapsed_s']} s; "
          f"written to {out_dir / 'flash_check.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
