"""Profile: per-layer method and option overrides keyed to a checkpoint, stored as JSON (never pickle)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_ARCH_FIELDS = ("model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size", "head_dim")


def config_fingerprint(config: Any) -> str:
    """A short hash of the architecture fields a profile depends on."""
    c = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    data = {k: getattr(c, k, None) for k in _ARCH_FIELDS}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Profile:
    """Per-layer overrides: `layers[i]` may set "method", "decode" and any of their options.

    `config_hash` (from `config_fingerprint`) ties the profile to an architecture; patching a model
    with a different architecture is refused.
    """

    name: str = ""
    config_hash: str | None = None
    layers: dict[int, dict[str, Any]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def check(self, config: Any, num_layers: int) -> None:
        if self.config_hash is not None and self.config_hash != config_fingerprint(config):
            raise ValueError(
                f"profile {self.name!r} was made for architecture {self.config_hash}, "
                f"this model is {config_fingerprint(config)}"
            )
        bad = [i for i in self.layers if not 0 <= int(i) < num_layers]
        if bad:
            raise ValueError(f"profile {self.name!r} names layers {bad}; the model has layers 0..{num_layers - 1}")

    def for_layer(self, i: int) -> dict[str, Any]:
        return dict(self.layers.get(i, {}))

    def save(self, path: str | Path) -> None:
        data = {"name": self.name, "config_hash": self.config_hash, "meta": self.meta,
                "layers": {str(k): v for k, v in sorted(self.layers.items())}}
        Path(path).write_text(json.dumps(data, indent=2))

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        data = json.loads(Path(path).read_text())
        unknown = set(data) - {"name", "config_hash", "meta", "layers"}
        if unknown:
            raise ValueError(f"profile {path} has unknown keys {sorted(unknown)}; allowed: name, config_hash, meta, layers")
        layers = {int(k): dict(v) for k, v in data.get("layers", {}).items()}
        return cls(data.get("name", ""), data.get("config_hash"), layers, data.get("meta", {}))
