"""Cache layers for decode methods, and their installation into transformers' caches."""

from attnpatch.cache.install import install_layers
from attnpatch.cache.pages import PageBoundsLayer, StaticPageBoundsLayer, key_page_bounds
from attnpatch.cache.recycled import RecycledLayer, RecycledState, StaticRecycledLayer
from attnpatch.cache.sink_window import SinkWindowLayer

__all__ = ["PageBoundsLayer", "RecycledLayer", "RecycledState", "SinkWindowLayer", "StaticPageBoundsLayer",
           "StaticRecycledLayer", "install_layers", "key_page_bounds"]
