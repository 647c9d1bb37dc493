"""`a_shape`: attention sinks + a local window, as a block selection (the standard prefill baseline)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from attnpatch.methods.base import PrefillContext
from attnpatch.methods.estimated import EstimatedPrefill
from attnpatch.options import option
from attnpatch.registry import register_prefill
from attnpatch.sparsity import num_blocks


@register_prefill("a_shape")
@dataclass
class AShape(EstimatedPrefill):
    """Sink blocks + local blocks up to the diagonal (StreamingLLM's A-shape pattern as block sparsity).

    Made of forced regions only (no estimate): the sink is `sink_blocks * block_size` tokens from
    each row's first non-padding token (left-padded rows keep their real sink, not padding; a
    sliding-window layer's window start is not a sink); the local window is the `local_blocks` key
    blocks ending at the block that holds the query block's last token, widened to also cover the
    block of its first token when a chunked-prefill offset misaligns them. Clipped to the causal
    rule, the layer's sliding window and padding. Same selection for every head.
    """

    fast_from: ClassVar[int | None] = 32768  # H200: 9.8× SDPA cuDNN at 32K (methods_h200); shorter not measured
    on_window_layers: ClassVar[str] = "select"  # clipped to the window (tested)
    full_density: ClassVar[dict] = {"local_blocks": 1 << 20}

    block_size: int = option(64, "query and key block size in tokens", choices=(16, 32, 64, 128))
    sink_blocks: int = option(1, "key blocks kept from each sequence's first real token", min=0)
    local_blocks: int = option(8, "key blocks kept up to and including the diagonal block", min=1)

    def estimate(self, query, key, ctx: PrefillContext) -> None:
        return None

    def dense_reason(self, q_len: int, kv_len: int, ctx: PrefillContext) -> str | None:
        if num_blocks(kv_len, self.block_size) <= self.sink_blocks + self.local_blocks:
            return f"input of {kv_len} keys fits in sink+local ({self.sink_blocks}+{self.local_blocks} blocks)"
        return None
