"""Benchmarks: kernel-level timings against SDPA (cuDNN, flash) and FlexAttention → JSON, markdown, PNG."""
