"""Cache layers for decode methods, and their installation into transformers' caches."""

from attnpatch.cache.sink_window import SinkWindowLayer, install_layers

__all__ = ["SinkWindowLayer", "install_layers"]
