"""Shared block/token scorers that prefill methods' `estimate` build on (pooled q·k, antidiagonal
sums, last-query attention, low-bit estimates, proxy heads): one small module each, no L×L tensor,
torch ops or Triton on the input's device."""
