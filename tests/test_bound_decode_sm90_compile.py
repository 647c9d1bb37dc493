"""The one-launch page-bound decode kernel compiles for a Hopper GPU (sm_90) without one: Triton lowers it to
PTX and its bundled ptxas assembles a cubin, with the cooperative launch flag, the head barrier's atomics and a
shared-memory footprint that leaves room for one program per SM. Catches compile errors on CPU-only CI before a
GPU run (the GPU tests run it: tests/gpu/test_bound_decode_cuda.py)."""

from __future__ import annotations

import inspect

import pytest

triton = pytest.importorskip("triton")

from attnpatch.backends.triton import bound_decode  # noqa: E402

SM90_SHARED_BYTES = 227 * 1024  # the most one program may hold on an H100 / H200

POINTERS = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "PMIN": "*bf16", "PMAX": "*bf16", "FIRST": "*i64",
            "END": "*i64", "BOUNDS": "*fp32", "LISTS": "*i32", "COUNTS": "*i32", "WS": "*fp32", "SEM": "*i32",
            "Out": "*bf16", "KeyStart": "*i64", "KeyValid": "*u8"}


def _compile(page: int, key_valid: bool, warps: int = 4):
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:  # pragma: no cover  (another triton layout)
        pytest.skip(f"this triton has no ahead-of-time compile API: {e}")
    fn = bound_decode._bound_decode_kernel
    if not hasattr(fn, "fn"):
        pytest.skip("the kernel module was decorated under the interpreter")
    n_pages, k = 131072 // page, 8192 // page  # Llama-3.1-8B's shape at 128K, 1/16 of the pages
    const = dict(PAGE=page, TILE=max(page, 64), BLOCK_G=16, BLOCK_GC=4, HEAD_D=128, HEAD_DV=128,
                 BLOCK_P=max(16, n_pages // 16), BLOCK_N=n_pages, BLOCK_K=k, BLOCK_S=16, SOFTMAX_SUM=True,
                 SEARCH=2 if n_pages <= 1024 else 1, FUSED_COUNTS=True, PHASE=0, DOT_PRECISION="tf32",
                 HAS_KEY_START=not key_valid, HAS_KEY_VALID=key_valid)
    names = list(inspect.signature(fn.fn).parameters)
    signature = {n: "constexpr" if n in const else POINTERS.get(n, "fp32" if n.endswith("scale") else "i32")
                 for n in names}
    source = ASTSource(fn, signature, constexprs={(names.index(n),): v for n, v in const.items()})
    try:
        return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": warps, "num_stages": 2, "launch_cooperative_grid": True,
                                       "enable_fp_fusion": True})  # as the launches compile it
    except FileNotFoundError as e:  # pragma: no cover  (no bundled ptxas)
        pytest.skip(f"no ptxas to assemble sm_90 code: {e}")


@pytest.mark.parametrize(("page", "key_valid"), [(128, False), (64, True)])
def test_the_one_launch_kernel_compiles_for_sm90(page, key_valid):
    kernel = _compile(page, key_valid)
    assert kernel.asm.get("cubin")
    ptx = kernel.asm["ptx"]
    assert "atom.global" in ptx and "bar.sync" in ptx  # the head barrier and the merge counter
    assert kernel.metadata.launch_cooperative_grid
    assert kernel.metadata.shared <= SM90_SHARED_BYTES
