"""The one-launch page-bound decode kernel compiles for a Hopper GPU (sm_90) without one: Triton lowers it to
PTX and its bundled ptxas assembles a cubin, with the cooperative launch flag, the head barrier's atomics and a
shared-memory footprint that leaves room for one program per SM. Catches compile errors on CPU-only CI before a
GPU run (the GPU tests run it: tests/gpu/test_bound_decode_cuda.py). In a fresh process: once triton has been
imported under TRITON_INTERPRET (other tests), its library helpers are interpreted and cannot be compiled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

SM90_SHARED_BYTES = 227 * 1024  # the most one program may hold on an H100 / H200

_SCRIPT = textwrap.dedent("""
    import inspect, json, sys
    import triton
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:
        print(json.dumps({"skip": f"this triton has no ahead-of-time compile API: {e}"}))
        raise SystemExit(0)
    from attnpatch.backends.triton import bound_decode

    page, key_valid = int(sys.argv[1]), sys.argv[2] == "1"
    pointers = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "PMIN": "*bf16", "PMAX": "*bf16", "FIRST": "*i64",
                "END": "*i64", "BOUNDS": "*fp32", "LISTS": "*i32", "COUNTS": "*i32", "WS": "*fp32", "SEM": "*i32",
                "Out": "*bf16", "KeyStart": "*i64", "KeyValid": "*u8"}
    n_pages, k = 131072 // page, 8192 // page  # Llama-3.1-8B's shape at 128K, 1/16 of the pages
    const = dict(PAGE=page, TILE=max(page, 64), BLOCK_G=16, BLOCK_GC=4, HEAD_D=128, HEAD_DV=128,
                 BLOCK_P=max(16, n_pages // 16), BLOCK_N=n_pages, BLOCK_K=k, BLOCK_S=16, SOFTMAX_SUM=True,
                 SEARCH=2 if n_pages <= 1024 else 1, FUSED_COUNTS=True, PHASE=0, DOT_PRECISION="tf32",
                 HAS_KEY_START=not key_valid, HAS_KEY_VALID=key_valid)
    fn = bound_decode._bound_decode_kernel
    names = list(inspect.signature(fn.fn).parameters)
    signature = {n: "constexpr" if n in const else pointers.get(n, "fp32" if n.endswith("scale") else "i32")
                 for n in names}
    source = ASTSource(fn, signature, constexprs={(names.index(n),): v for n, v in const.items()})
    _, warps, stages = bound_decode.launch_config()  # the default launch
    try:
        kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": warps, "num_stages": stages, "launch_cooperative_grid": True,
                                         "enable_fp_fusion": True})  # as the launches compile it
    except FileNotFoundError as e:
        print(json.dumps({"skip": f"no ptxas to assemble sm_90 code: {e}"}))
        raise SystemExit(0)
    ptx = kernel.asm["ptx"]
    print(json.dumps({"cubin": len(kernel.asm.get("cubin") or b""), "atomics": "atom.global" in ptx,
                      "barrier": "bar.sync" in ptx, "cooperative": bool(kernel.metadata.launch_cooperative_grid),
                      "shared": kernel.metadata.shared}))
""")


@pytest.mark.parametrize(("page", "key_valid"), [(128, False), (64, True)])
def test_the_one_launch_kernel_compiles_for_sm90(page, key_valid):
    pytest.importorskip("triton")
    env = {name: val for name, val in os.environ.items()
           if name not in ("TRITON_INTERPRET", "ATTNPATCH_BOUND_DECODE_CONFIG")}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    res = subprocess.run([sys.executable, "-c", _SCRIPT, str(page), str(int(key_valid))], capture_output=True,
                         text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    if "skip" in got:
        pytest.skip(got["skip"])
    assert got["cubin"] > 0 and got["atomics"] and got["barrier"]  # the head barrier and the merge counter
    assert got["cooperative"]
    assert got["shared"] <= SM90_SHARED_BYTES
