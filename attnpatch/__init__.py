"""attnpatch: sparse and retrieval attention for Hugging Face Transformers LLMs, hooked, not forked."""

from attnpatch.api import Patch, patch_model, unpatch_model
from attnpatch.probe import AttentionCall
from attnpatch.profile import Profile
from attnpatch.registry import list_methods
from attnpatch.spec import PatchSpec

__all__ = ["AttentionCall", "Patch", "PatchSpec", "Profile", "list_methods", "patch_model", "unpatch_model"]
__version__ = "0.1.0"
