"""attnpatch: sparse and retrieval attention for Hugging Face Transformers LLMs, hooked, not forked.

The public names load on first use (PEP 562), so that light entry points (`attnpatch lm-eval
--help`) answer without importing torch; using any of them loads `attnpatch.api`, which registers
the built-in methods and the attention function with transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from attnpatch.api import Patch, patch_model, unpatch_model
    from attnpatch.cache.retrieval_layer import retrieval_report
    from attnpatch.methods.decode.infiniretri import generate_long, read_long
    from attnpatch.probe import AttentionCall
    from attnpatch.profile import Profile
    from attnpatch.registry import list_methods
    from attnpatch.spec import PatchSpec

_HOMES = {
    "Patch": "attnpatch.api",
    "patch_model": "attnpatch.api",
    "unpatch_model": "attnpatch.api",
    "AttentionCall": "attnpatch.probe",
    "Profile": "attnpatch.profile",
    "list_methods": "attnpatch.registry",
    "PatchSpec": "attnpatch.spec",
    "read_long": "attnpatch.methods.decode.infiniretri",
    "generate_long": "attnpatch.methods.decode.infiniretri",
    "retrieval_report": "attnpatch.cache.retrieval_layer",
}

__all__ = ["AttentionCall", "Patch", "PatchSpec", "Profile", "generate_long", "list_methods", "patch_model",
           "read_long", "retrieval_report", "unpatch_model"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """Load a public name on first access (after `attnpatch.api`, so the method tables are filled)."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'attnpatch' has no attribute {name!r}")
    importlib.import_module("attnpatch.api")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
