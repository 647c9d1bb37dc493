"""Built-in methods, one small file each under prefill/ and decode/; importing this package registers them."""

from attnpatch.methods.decode import blasst as _decode_blasst  # noqa: F401
from attnpatch.methods.decode import dense as _decode_dense  # noqa: F401
from attnpatch.methods.decode import streaming  # noqa: F401
from attnpatch.methods.prefill import a_shape, blasst, dense  # noqa: F401
