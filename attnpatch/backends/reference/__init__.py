"""The reference backend: exact PyTorch executors (any device; what every fast backend is tested
against) and the oracles of the Triton kernels' tiled semantics."""

from attnpatch.backends.reference.executors import (
    block_sparse_attention,
    merge_partials,
    negligible_rows,
    paged_decode_attention,
    token_gather_attention,
)
from attnpatch.backends.reference.oracles import (
    block_sparse_attention_tiled_reference,
    sparse_decode_attention_reference,
)

__all__ = ["block_sparse_attention", "block_sparse_attention_tiled_reference", "merge_partials", "negligible_rows",
           "paged_decode_attention", "sparse_decode_attention_reference", "token_gather_attention"]
