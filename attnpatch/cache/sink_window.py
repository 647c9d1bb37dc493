"""`SinkWindowLayer`: a cache layer that keeps each row's first real tokens (sinks) and its latest ones."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer


class SinkWindowLayer(DynamicLayer):
    """Keeps, per row, the first `n_sink` real tokens and the last `window` tokens; evicts the rest.

    Keys keep the RoPE positions they were computed at (no re-rotation): attention runs over
    sinks + window at their original positions, which stays inside the trained range for contexts
    up to the model's window. `update` returns the previously stored tokens plus the new ones (so a
    prefill chunk still sees itself whole), then trims what is stored to `n_sink + window` tokens
    per row.

    Left padding: the sinks of a padded row are its first real tokens (`set_first_real(start)`, called
    by the patch before every forward from the batch's attention mask). Every row stores the same
    number of tokens; a row with fewer real tokens than that fills the rest with its own padding
    positions, which the attention mask hides. The original position of every returned key is in
    `returned_positions` (`[B, L]`); the layer reports to transformers the *virtual* length (all
    tokens seen), so masks are built as for a full cache and the attention function picks the
    columns of the returned keys.
    """

    is_sliding = False
    is_croppable = False
    static_unsupported = ("a static cache cannot evict: it keeps every token, and each streaming decode step "
                          "reads the sinks + window from it")

    def __init__(self, n_sink: int, window: int):
        super().__init__()
        self.n_sink, self.window = n_sink, window
        self.cumulative_length = 0
        self.first_real: torch.Tensor | None = None  # [B] first non-padding position per row
        self.positions: torch.Tensor | None = None  # [B, stored] original positions of the stored keys
        self.returned_positions: torch.Tensor | None = None  # [B, L] of the keys the last update returned

    def set_first_real(self, start: torch.Tensor | None) -> None:
        """Each row's first non-padding position `[B]` (None: no padding)."""
        self.first_real = start

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.positions = torch.zeros(key_states.shape[0], 0, dtype=torch.long, device=self.device)

    def _keep(self, positions: torch.Tensor, n_keep: int) -> torch.Tensor:
        """`[B, n_keep]` indices (ascending) into `positions` of what each row stores."""
        b, n = positions.shape
        start = torch.zeros(b, dtype=torch.long, device=self.device) if self.first_real is None else \
            self.first_real.to(self.device, torch.long)
        start = start.view(b, 1)
        real_kept = ((positions >= start) & (positions < start + self.n_sink)) | \
            (positions >= self.cumulative_length - self.window)
        filler = positions < start  # padding positions fill rows with fewer real tokens
        priority = torch.where(real_kept, 0, torch.where(filler, 1, 2))
        order = (priority * (n + 1) + torch.arange(n, device=self.device)).argsort(dim=-1)[:, :n_keep]
        return order.sort(dim=-1).values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, new = key_states.shape[0], key_states.shape[-2]
        new_pos = torch.arange(self.cumulative_length, self.cumulative_length + new, device=self.device)
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        positions = torch.cat([self.positions, new_pos.expand(b, new)], dim=-1)
        self.cumulative_length += new
        n, n_keep = keys.shape[-2], self.n_sink + self.window
        if n > n_keep:
            keep = self._keep(positions, n_keep)
            index = keep.view(b, 1, n_keep, 1)
            self.keys = keys.gather(2, index.expand(b, keys.shape[1], n_keep, keys.shape[-1]))
            self.values = values.gather(2, index.expand(b, values.shape[1], n_keep, values.shape[-1]))
            self.positions = positions.gather(1, keep)
        else:
            self.keys, self.values, self.positions = keys, values, positions
        self.returned_positions = positions
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return self.n_sink + self.window

    def stored_length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def reset(self) -> None:
        super().reset()
        self.cumulative_length = 0
        self.positions = self.returned_positions = None

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "the streaming (sink + window) cache evicts tokens and cannot be cropped; "
            "use decode='dense' for assisted or speculative decoding"
        )
