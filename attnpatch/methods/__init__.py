"""Built-in methods; importing this package registers them."""

from attnpatch.methods import a_shape, blasst, dense, streaming  # noqa: F401
