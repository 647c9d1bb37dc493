"""attnpatch: sparse and retrieval attention for Hugging Face Transformers LLMs, hooked, not forked."""

from attnpatch.api import Patch, patch_model, unpatch_model
from attnpatch.profile import Profile
from attnpatch.registry import list_methods

__all__ = ["Patch", "Profile", "list_methods", "patch_model", "unpatch_model"]
__version__ = "0.1.0"
