"""Load an attnpatch kernel module as a private copy decorated under the Triton CPU interpreter.

The copy does not depend on whether another test imported the GPU-compiled module first, and no
other test gets interpreted kernels from it. TRITON_INTERPRET is set only while loading (and, via
`interpret_env`, while the calling module's tests run).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import torch

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "attnpatch"
KERNELS_DIR = PACKAGE_DIR / "backends" / "triton"


@contextlib.contextmanager
def interpret_env():
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous


def _interpreter_takes_tensor_loop_bounds(triton, tl) -> bool:
    """Triton <= 3.6's interpreter turns loaded scalars into 1-element arrays, which NumPy >= 2.4
    refuses as a `range` bound; the kernels' loops need that."""

    @triton.jit
    def probe(x_ptr, y_ptr):
        total = 0.0
        for _ in range(0, tl.load(x_ptr)):
            total += 1.0
        tl.store(y_ptr, total)

    y = torch.zeros(1)
    try:
        probe[(1,)](torch.tensor([3], dtype=torch.int32), y)
    except Exception:
        return False
    return float(y[0]) == 3.0


def load_interpreted(filename: str, directory: Path = KERNELS_DIR, uses: tuple[str, ...] = ()
                     ) -> tuple[ModuleType | None, str | None]:
    """`(module, None)`, or `(None, why the kernel tests cannot run here)`: `directory / filename` (a
    kernel module of attnpatch/backends/triton by default). `uses`: the kernel modules of that folder
    whose @jit helpers the module imports (e.g. "decode.py"); interpreted copies of them stand in for the
    package's modules while it loads, so its kernels call interpreted helpers.

    Not on a machine with a CUDA GPU: running interpreted kernels patches `triton.language` for the
    rest of the process, and compiled kernels (tests/gpu) then fail to build. There the kernels are
    tested compiled.
    """
    if torch.cuda.is_available():
        return None, "a CUDA GPU is present: the kernels are tested compiled (tests/gpu), not interpreted"
    with interpret_env():
        try:
            import triton
            import triton.language as tl
        except ImportError:
            return None, "triton is not installed"
        if not _interpreter_takes_tensor_loop_bounds(triton, tl):
            return None, (f"the Triton {triton.__version__} interpreter cannot use loaded scalars as loop bounds "
                          "with this NumPy (use NumPy < 2.4 or a newer Triton to run these CPU tests)")
        stand_ins = {}
        for used in uses:
            helper, why = load_interpreted(used, directory)
            if helper is None:
                return None, why
            stand_ins[_package_name(directory / used)] = helper
        saved = {name: sys.modules.get(name) for name in stand_ins}
        sys.modules.update(stand_ins)
        try:
            name = f"_attnpatch_{Path(filename).stem}_interpreted"
            spec = importlib.util.spec_from_file_location(name, directory / filename)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        finally:
            for name, previous in saved.items():
                if previous is None:
                    sys.modules.pop(name, None)
                else:
                    sys.modules[name] = previous
    assert module._KERNEL_INTERPRETED
    return module, None


def _package_name(path: Path) -> str:
    """The import name of a module file of the attnpatch package."""
    return ".".join(path.resolve().relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
