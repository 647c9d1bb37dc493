"""Backends: the executors of selections, behind one protocol (`base.Backend`), and the one table
that dispatch, the tests and the benchmarks read.

`resolve_backend("auto")` takes, per phase, the fastest backend measured on the H200 that accepts
the input (../shared/docs/architecture.md, "Kernel libraries measured"; bench/results/):
prefill selections go to flash-attn-4 (1.02–1.07 of cuDNN per kept block from 32K, against
0.83–0.91 for the Triton kernel) when it is installed and the GPU is SM90/SM100, else to Triton,
else to the exact PyTorch reference; decode goes to Triton (flash-attn-4 has no split-KV decode on
SM90), else to the reference. Dense prefill stays transformers' SDPA under "auto" (bit-identical to
the unpatched model); an explicit backend with a dense path (flash) runs it. On CUDA, "auto" also runs a
prefill dense where the method was measured slower than dense SDPA (`BackendPlan.speed_gate`); "sparse"
is "auto" without that gate: the method always runs, as an evaluation of its accuracy needs. A backend named
explicitly runs what it can and leaves the rest to the reference, never to another fast backend.
Every declined backend's reason is counted in the patch's stats.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from attnpatch.backends.base import Backend
from attnpatch.backends.flash import FlashBackend
from attnpatch.backends.flex import FlexBackend
from attnpatch.backends.reference.backend import ReferenceBackend
from attnpatch.backends.triton.backend import TritonBackend
from attnpatch.sparsity import BoundPages, KeyBounds, PageSelection

BACKENDS: dict[str, Backend] = {b.name: b for b in (ReferenceBackend(), TritonBackend(), FlexBackend(), FlashBackend())}
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "prefill": ("flash", "triton", "reference"),
    "decode": ("triton", "reference"),
}
UNGATED_AUTO = "sparse"  # "auto" without the speed gate
BACKEND_NAMES = ("auto", UNGATED_AUTO, *BACKENDS)
GATED_DEVICES = ("cuda",)  # where `BackendPlan.speed_gate` applies: the speed measurements are the H200's


def backend_table() -> list[dict[str, str]]:
    """Name and description of every backend (CLI, docs)."""
    return [{"name": b.name, "description": b.description} for b in BACKENDS.values()]


@dataclass
class BackendPlan:
    """The backends a patch tries, in order, per phase; runs a call on the first that accepts it."""

    prefill_order: tuple[str, ...]
    decode_order: tuple[str, ...]
    dense_backend: str | None = None  # an explicit backend with a dense prefill path
    prefill_auto: bool = False  # prefill backend "auto": the fastest measured, dense included (`speed_gate`)
    _unavailable: dict = field(default_factory=dict, repr=False)

    def speed_gate(self, method: str, fast_from: int | None, kv_len: int, device: torch.device) -> str | None:
        """Why an `auto` prefill on CUDA runs dense rather than `method` (None: run the method). `fast_from`:
        the shortest input (keys) at which the method, estimate included, was measured faster than SDPA's
        dense cuDNN kernel on the H200 (None: slower at every length measured; 0: no gate). An explicit
        backend, or a device other than CUDA, always runs the method."""
        if not self.prefill_auto or torch.device(device).type not in GATED_DEVICES or fast_from == 0:
            return None
        force = "backend='triton' (or 'flash') runs it anyway"
        if fast_from is None:
            return (f"backend 'auto': {method} was slower than dense SDPA at every length measured on the H200 "
                    f"(bench/results/README.md), so dense is the fastest; {force}")
        if kv_len < fast_from:
            return (f"backend 'auto': {method} is measured faster than dense SDPA from {fast_from} keys on the H200; "
                    f"below that ({kv_len} keys) dense is the fastest; {force}")
        return None

    def resolve_decode_devices(self, device: torch.device) -> None:
        """Look up now whether each decode backend runs on `device` (cached): a compiled decode step
        must not fill that cache inside a conditional branch (`torch.cond` refuses outside mutation)."""
        for name in self.decode_order:
            self._why_not(name, device)

    def _why_not(self, name: str, device: torch.device) -> str | None:
        key = (name, str(device))
        if key not in self._unavailable:
            self._unavailable[key] = BACKENDS[name].unavailable(device)
        return self._unavailable[key]

    def _first(self, order, phase, reason_of, run, device, declined):
        """`(run(backend), name)` of the first backend of `order` that takes the call, or `(None, None)`; the
        others' reasons go to `declined` under `phase`."""
        for name in order:
            why = self._why_not(name, device) or reason_of(BACKENDS[name])
            if why is None:
                return run(BACKENDS[name]), name
            declined.append(f"{phase}: {name}: {why}")
        return None, None

    def _run(self, order, phase, reason_of, run, device, declined):
        out, name = self._first(order, phase, reason_of, run, device, declined)
        if name is None:
            raise RuntimeError(f"no backend accepted this {phase} call: {declined}")
        return out, name

    def prefill(self, query, key, value, selection, *, scale: float, bounds: KeyBounds, tile_counts=None,
                declined: list[str]):
        """`(out [B, Hq, Lq, Dv], backend name)`; reasons of the backends that declined go to `declined`."""
        return self._run(
            self.prefill_order, "prefill",
            lambda b: b.prefill_reason(query, key, value, selection, bounds),
            lambda b: b.prefill(query, key, value, selection, scale=scale, bounds=bounds, tile_counts=tile_counts),
            query.device, declined)

    def dense(self, query, key, value, *, scale: float, bounds: KeyBounds, declined: list[str]):
        """`(out, backend name)` on the explicit dense backend, or `(None, None)` (run SDPA)."""
        if self.dense_backend is None:
            return None, None
        b = BACKENDS[self.dense_backend]
        why = self._why_not(b.name, query.device) or b.dense_reason(query, key, value, bounds)
        if why is not None:
            declined.append(f"dense prefill: {b.name}: {why}")
            return None, None
        return b.dense(query, key, value, scale=scale, bounds=bounds), b.name

    def dense_decode(self, query, key, value, *, scale: float, bounds: KeyBounds, declined: list[str],
                     page_size: int = 64):
        """`(out, backend name)` of a decode step over every written page on the first fast decode
        backend that takes it (the Triton split-KV kernel: the best dense decode measured on the H200,
        4.3x transformers' SDPA at 128K, batch 4), or `(None, None)`: run SDPA. For the steps a sparse
        decode method declines (its dense layers, short contexts); the `dense` method keeps SDPA."""
        fast = [name for name in self.decode_order if name != "reference"]
        if not fast:
            return None, None
        pages = PageSelection.all_pages(query.shape[0], key.shape[1], key.shape[2], page_size, query.device,
                                        key_end=bounds.key_end)
        return self._first(fast, "dense decode", lambda b: b.decode_reason(query, key, value, pages, bounds),
                           lambda b: b.decode(query, key, value, pages, scale=scale, bounds=bounds),
                           query.device, declined)

    def decode(self, query, key, value, selection: PageSelection, *, scale: float, bounds: KeyBounds,
               tile_counts=None, declined: list[str]):
        return self._run(
            self.decode_order, "decode",
            lambda b: b.decode_reason(query, key, value, selection, bounds),
            lambda b: b.decode(query, key, value, selection, scale=scale, bounds=bounds, tile_counts=tile_counts),
            query.device, declined)

    def decode_page_lse(self, query, key, value, selection: PageSelection, *, scale: float, bounds: KeyBounds,
                        declined: list[str]):
        """`((out, page_lse), backend name)` from the first decode backend that also writes each listed page's
        log-sum-exp (`Backend.decode_page_lse`), or `(None, None)`: the caller ranks pages with its own pass."""
        return self._first(
            self.decode_order, "decode with page log-sum-exp",
            lambda b: (b.decode_reason(query, key, value, selection, bounds)
                       or b.decode_page_lse_reason(query, key, value, selection, bounds)),
            lambda b: b.decode_page_lse(query, key, value, selection, scale=scale, bounds=bounds),
            query.device, declined)

    def decode_bound(self, query, key, value, pages: BoundPages, *, scale: float, bounds: KeyBounds,
                     declined: list[str]):
        """`(out, backend name)` from the first decode backend that makes the selection `pages` describes in
        the launch that attends (`Backend.decode_bound`), or `(None, None)`: the caller selects separately."""
        return self._first(self.decode_order, "decode with the selection in the launch",
                           lambda b: b.decode_bound_reason(query, key, value, pages, bounds),
                           lambda b: b.decode_bound(query, key, value, pages, scale=scale, bounds=bounds),
                           query.device, declined)


def _check_name(name, phase: str) -> str:
    if not isinstance(name, str) or name not in BACKEND_NAMES:
        raise ValueError(f"unknown {phase} backend {name!r}; allowed: {', '.join(BACKEND_NAMES)}")
    return name


def resolve_backend(backend: str | Mapping[str, str] = "auto") -> BackendPlan:
    """A `BackendPlan` from a backend name (both phases) or `{"prefill": name, "decode": name}`;
    ValueError names the allowed backends."""
    if isinstance(backend, Mapping):
        unknown = set(backend) - {"prefill", "decode"}
        if unknown:
            raise ValueError(f"backend mapping keys must be 'prefill' and/or 'decode', got {sorted(unknown)}")
        pre, dec = backend.get("prefill", "auto"), backend.get("decode", "auto")
    else:
        pre = dec = backend
    pre, dec = _check_name(pre, "prefill"), _check_name(dec, "decode")

    def order(name: str, phase: str) -> tuple[str, ...]:
        if name in ("auto", UNGATED_AUTO):
            return AUTO_ORDER[phase]
        return (name,) if name == "reference" else (name, "reference")

    dense = pre if pre in BACKENDS and pre != "reference" and type(BACKENDS[pre]).dense is not Backend.dense else None
    return BackendPlan(order(pre, "prefill"), order(dec, "decode"), dense, prefill_auto=pre == "auto")


__all__ = ["AUTO_ORDER", "BACKENDS", "BACKEND_NAMES", "GATED_DEVICES", "UNGATED_AUTO", "Backend", "BackendPlan",
           "backend_table", "resolve_backend"]
