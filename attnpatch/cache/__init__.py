"""Cache layers for decode methods, and their installation into transformers' caches."""

from attnpatch.cache.install import install_layers
from attnpatch.cache.sink_window import SinkWindowLayer

__all__ = ["SinkWindowLayer", "install_layers"]
