"""Timing one call on a device: CUDA events on CUDA, the wall clock elsewhere."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def timed_ms(fn: Callable[[], T], device: torch.device) -> tuple[float, T]:
    """`(milliseconds, result)` of `fn()`: on CUDA between two events recorded after the device's earlier work
    (the device is synchronized first), elsewhere by the wall clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end)), out
    t0 = time.perf_counter()
    out = fn()
    return (time.perf_counter() - t0) * 1e3, out
