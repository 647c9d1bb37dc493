"""Small helpers shared by the Triton kernels: availability checks that never import-fail."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import TypeVar

import torch

_AVAILABLE: list[bool] = []  # memo (a plain global, not functools.lru_cache: torch.compile traces it cleanly)


def triton_available() -> bool:
    """True when `triton` (and `triton.language`) can be imported."""
    if not _AVAILABLE:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401

            _AVAILABLE.append(True)
        except Exception:  # ImportError, or a broken install failing at import time
            _AVAILABLE.append(False)
    return _AVAILABLE[0]


def interpreter_enabled() -> bool:
    """True when Triton's CPU interpreter is requested (`TRITON_INTERPRET=1`).

    Triton reads the variable when a kernel is decorated, so it must be set before the kernel
    module is imported for kernels to actually run on CPU tensors.
    """
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def is_interpreted(kernel) -> bool:
    """Whether a `@triton.jit` object was decorated under the interpreter (runs on CPU tensors)."""
    return type(kernel).__name__ == "InterpretedFunction"


def tensor_device_ok(t: torch.Tensor, interpreted: bool) -> bool:
    """Whether a Triton kernel can read `t`: a CUDA tensor, or a CPU tensor for an interpreted kernel."""
    return t.is_cuda or (t.device.type == "cpu" and interpreted)


def with_contiguous_last_dim(t: torch.Tensor) -> torch.Tensor:
    """`t` itself when its last dimension has unit stride, else a contiguous copy."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


F = TypeVar("F", bound=Callable)


def on_input_device(fn: F) -> F:
    """Run a kernel wrapper with its first tensor's GPU as the current device.

    Triton launches on the *current* CUDA device, not on the tensors' one: a model spread over GPUs
    (accelerate's `device_map`) calls layers on `cuda:1` while `cuda:0` is current, and the kernel
    would then run on the wrong GPU, reading the other GPU's memory without stream ordering.
    """

    @functools.wraps(fn)
    def wrapper(first, *args, **kwargs):
        if isinstance(first, torch.Tensor) and first.is_cuda and first.device.index != torch.cuda.current_device():
            with torch.cuda.device(first.device):
                return fn(first, *args, **kwargs)
        return fn(first, *args, **kwargs)

    return wrapper  # type: ignore[return-value]
