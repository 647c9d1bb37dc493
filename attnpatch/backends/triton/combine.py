"""The combine functions `tl.max` / `tl.sum` use, for the kernels' `tl.reduce` calls (defined only when
triton is installed).

Row reductions go through `tl.reduce` with these rather than through `tl.max` / `tl.sum`: identical code
on the GPU, and the Triton interpreter recognises them (numpy fast path) and patches `tl.reduce` at call
time, so a kernel also interprets when triton itself was imported before TRITON_INTERPRET was set (its
@jit library functions are then compiled-only). Older triton releases without these names get local
equivalents.
"""

from __future__ import annotations

from attnpatch.backends.triton.utils import triton_available

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _max_combine_fallback(a, b):
        return tl.maximum(a, b)

    @triton.jit
    def _sum_combine_fallback(a, b):
        return a + b

    MAX_COMBINE = getattr(tl.standard, "_elementwise_max", _max_combine_fallback)
    SUM_COMBINE = getattr(tl.standard, "_sum_combine", _sum_combine_fallback)
