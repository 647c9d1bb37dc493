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


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def scorer_input_reason(query: torch.Tensor, key: torch.Tensor, interpreted: bool, max_head_dim: int = 256
                        ) -> str | None:
    """Why a Triton block scorer (an estimator's kernel) cannot read `query [B, Hq, Lq, D]` and `key
    [B, Hkv, Lk, D]` (queries aligned to the end of the keys), or None; the caller adds its own limits."""
    if not triton_available():
        return "triton is not installed"
    if not tensor_device_ok(query, interpreted) or key.device != query.device:
        return f"device {query.device} (need CUDA, or CPU with TRITON_INTERPRET=1 set before import)"
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {query.dtype}; allowed: float16, bfloat16, float32"
    if key.dtype != query.dtype:
        return f"query dtype {query.dtype} and key dtype {key.dtype} differ"
    if query.dim() != 4 or key.dim() != 4 or query.shape[-1] != key.shape[-1]:
        return f"shapes {tuple(query.shape)} / {tuple(key.shape)} (need [B, H, L, D] with one head dim)"
    if query.shape[-1] > max_head_dim:
        return f"head dim {query.shape[-1]} above {max_head_dim}"
    if query.shape[1] % key.shape[1]:
        return f"{query.shape[1]} query heads are not a multiple of {key.shape[1]} KV heads"
    if query.shape[2] > key.shape[2]:
        return f"more queries ({query.shape[2]}) than keys ({key.shape[2]})"
    return None


def with_contiguous_last_dim(t: torch.Tensor) -> torch.Tensor:
    """`t` itself when its last dimension has unit stride, else a contiguous copy."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def per_row_bound(t: torch.Tensor | int, batch: int, device, caller: str) -> tuple[torch.Tensor, int]:
    """A `[B]` / 0-dim / int bound as a device tensor and its stride over the batch (0: shared); ValueError
    (naming `caller`) for any other shape."""
    t = torch.as_tensor(t, device=device)
    if t.dim() == 0 or t.numel() == 1:
        return t.reshape(1), 0
    if t.shape != (batch,):
        raise ValueError(f"{caller}: a per-row bound must have shape ({batch},), got {tuple(t.shape)}")
    return t, t.stride(0)


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


FP32_MAX_GPU_HEAD_DIM = 128  # float32 tiles of larger head dims (256) exceed a GPU's shared memory


def fp32_tiles_reason(query: torch.Tensor) -> str | None:
    """Why float32 `query` cannot run on a GPU kernel at its head dim (None when it can): its tiles would
    exceed the shared memory; the interpreter (CPU) has no such limit."""
    d = query.shape[-1]
    if query.is_cuda and query.dtype == torch.float32 and d > FP32_MAX_GPU_HEAD_DIM:
        return f"float32 at head dim {d} (its tiles exceed the GPU's shared memory; run bf16 or fp16)"
    return None
