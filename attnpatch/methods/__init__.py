"""Built-in methods; importing this package registers them."""

from attnpatch.methods.decode import streaming  # noqa: F401
from attnpatch.methods.prefill import a_shape, blasst, dense  # noqa: F401
