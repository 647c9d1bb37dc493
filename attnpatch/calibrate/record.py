"""Record the Q/K/V every layer receives on real prompts (dense prefill, through the probe): one
forward per prompt serves every head of every layer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from attnpatch.api import patch_model
from attnpatch.probe import AttentionCall
from attnpatch.sparsity import KeyBounds


@dataclass
class LayerInputs:
    """A layer's prefill inputs over the calibration prompts (one entry per prompt)."""

    layer: int
    scale: float
    window: int | None
    query: list[torch.Tensor] = field(default_factory=list)
    key: list[torch.Tensor] = field(default_factory=list)
    value: list[torch.Tensor] = field(default_factory=list)
    bounds: list[KeyBounds] = field(default_factory=list)


def recorder(layers: dict[int, LayerInputs], keep_window_layers: bool = False,
             active: Callable[[], bool] = lambda: True) -> Callable[[AttentionCall], None]:
    """A probe observer that appends every prefill call's Q/K/V (detached) to `layers` while `active()`
    (sliding-window layers whose window does not cover the prompt left out unless `keep_window_layers`)."""

    def keep(call: AttentionCall) -> None:
        if call.phase != "prefill" or not active():
            return
        window = call.bounds.window
        if window is not None and window < call.key.shape[2] and not keep_window_layers:
            return
        rec = layers.setdefault(call.layer, LayerInputs(call.layer, call.scale, window))
        rec.query.append(call.query.detach())
        rec.key.append(call.key.detach())
        rec.value.append(call.value.detach())
        rec.bounds.append(call.bounds)

    return keep


def record_layers(model, prompts: list[torch.Tensor], keep_window_layers: bool = False) -> dict[int, LayerInputs]:
    """`{layer: LayerInputs}` from one dense forward per prompt (no LM head). Sliding-window layers
    whose window does not cover the prompt are left out unless `keep_window_layers` (methods do not
    run there)."""
    layers: dict[int, LayerInputs] = {}
    with torch.no_grad(), patch_model(model, "dense") as patch:
        patch.observe(recorder(layers, keep_window_layers))
        for ids in prompts:
            model.get_decoder()(input_ids=ids.to(model.device), use_cache=False)
    return dict(sorted(layers.items()))
