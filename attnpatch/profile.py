"""Profile: per-layer (and per-head) method parameters tied to one checkpoint, stored as JSON (never pickle).

A profile names, per layer, a prefill `method` and/or `decode` method and their options; an option
declared per head takes one value per query head. It carries the fingerprint of the checkpoint it
was made for: the architecture (model type, layers, heads, sizes) and a hash of the weights. A
profile for another architecture is refused; one for other weights of the same architecture (a
fine-tune) is refused unless the caller says so (`allow_other_weights=True`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ARCH_FIELDS = ("model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size",
               "head_dim")
_FILE_KEYS = ("name", "fingerprint", "config_hash", "meta", "layers")
_SAMPLES_PER_TENSOR = 1024


def _text_config(config: Any) -> Any:
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def architecture(config: Any) -> dict[str, Any]:
    """The architecture fields a profile depends on."""
    c = _text_config(config)
    return {k: getattr(c, k, None) for k in ARCH_FIELDS}


def config_fingerprint(config: Any) -> str:
    """A short hash of `architecture(config)`."""
    return hashlib.sha256(json.dumps(architecture(config), sort_keys=True).encode()).hexdigest()[:16]


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the weights: every parameter's name, shape, dtype and a strided sample of at
    most 1024 of its values (cheap on an 8B model; any fine-tune changes it)."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        if p.device.type == "meta" or p.numel() == 0:
            continue
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // _SAMPLES_PER_TENSOR)][:_SAMPLES_PER_TENSOR]
        h.update(sample.float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def model_fingerprint(model: torch.nn.Module) -> dict[str, Any]:
    """What a profile records about the checkpoint it was made for."""
    import transformers

    return {"architecture": architecture(model.config), "architecture_hash": config_fingerprint(model.config),
            "weights_hash": weights_fingerprint(model),
            "model_name": getattr(model.config, "_name_or_path", "") or "",
            "transformers": transformers.__version__}


def _describe_arch(arch: dict[str, Any]) -> str:
    return (f"{arch.get('model_type')} ({arch.get('num_hidden_layers')} layers, {arch.get('num_attention_heads')}/"
            f"{arch.get('num_key_value_heads')} heads, hidden {arch.get('hidden_size')}, head dim {arch.get('head_dim')})")


def _normalise_layers(layers: Any, name: str) -> dict[int, dict[str, Any]]:
    if not isinstance(layers, dict):
        raise ValueError(f"profile {name!r}: layers must be a mapping of layer index to options")
    out: dict[int, dict[str, Any]] = {}
    for key, value in layers.items():
        if isinstance(key, bool) or not (isinstance(key, int) or (isinstance(key, str) and key.strip().isdigit())):
            raise ValueError(f"profile {name!r}: layer key {key!r} is not a layer index (an int or digits)")
        if not isinstance(value, dict):
            raise ValueError(f"profile {name!r}: layer {key} must map option names to values, got {value!r}")
        out[int(key)] = dict(value)
    return out


@dataclass
class Profile:
    """Per-layer overrides `layers[i]` ("method", "decode", their options — a float or one value per
    query head — or "prefill_options" / "decode_options" dicts) and the checkpoint's fingerprint."""

    name: str = ""
    fingerprint: dict[str, Any] | None = None
    layers: dict[int, dict[str, Any]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.layers = _normalise_layers(self.layers, self.name)

    @classmethod
    def for_model(cls, model: torch.nn.Module, layers: dict | None = None, name: str = "",
                  meta: dict | None = None) -> Profile:
        """A profile tied to `model`'s architecture and weights."""
        return cls(name, model_fingerprint(model), layers or {}, meta or {})

    def check(self, model: torch.nn.Module, num_layers: int, allow_other_weights: bool = False) -> None:
        """ValueError when the profile was made for another architecture, for other weights (unless
        `allow_other_weights`), or names layers the model does not have."""
        fp = self.fingerprint or {}
        arch = fp.get("architecture")
        if fp.get("architecture_hash") is not None and fp["architecture_hash"] != config_fingerprint(model.config):
            made = _describe_arch(arch) if arch else f"architecture {fp['architecture_hash']}"
            raise ValueError(f"profile {self.name!r} was made for a {made}; this model is a "
                             f"{_describe_arch(architecture(model.config))}: a profile only fits its architecture")
        if fp.get("weights_hash") is not None and not allow_other_weights:
            mine = weights_fingerprint(model)
            if mine != fp["weights_hash"]:
                raise ValueError(
                    f"profile {self.name!r} was made for other weights of this architecture (model "
                    f"{fp.get('model_name') or '?'!r}, weights {fp['weights_hash']}); this model "
                    f"({getattr(model.config, '_name_or_path', '') or '?'!r}) has weights {mine}. To use it "
                    "anyway (e.g. on a fine-tune of that model), pass allow_other_weights=True"
                )
        bad = sorted(i for i in self.layers if not 0 <= i < num_layers)
        if bad:
            raise ValueError(f"profile {self.name!r} names layers {bad}; the model has layers 0..{num_layers - 1}")

    def for_layer(self, i: int) -> dict[str, Any]:
        return dict(self.layers.get(i, {}))

    def describe(self) -> dict[str, Any]:
        fp = self.fingerprint or {}
        return {"name": self.name, "model_name": fp.get("model_name"), "weights_hash": fp.get("weights_hash")}

    def save(self, path: str | Path) -> None:
        data = {"name": self.name, "fingerprint": self.fingerprint, "meta": self.meta,
                "layers": {str(k): v for k, v in sorted(self.layers.items())}}
        Path(path).write_text(json.dumps(data, indent=2))

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"profile file {path} does not exist")
        data = json.loads(path.read_text())
        unknown = set(data) - set(_FILE_KEYS)
        if unknown:
            raise ValueError(f"profile {path} has unknown keys {sorted(unknown)}; allowed: {', '.join(_FILE_KEYS)}")
        fingerprint = data.get("fingerprint")
        if fingerprint is None and data.get("config_hash"):  # files written before fingerprints
            fingerprint = {"architecture_hash": data["config_hash"]}
        return cls(data.get("name", ""), fingerprint, data.get("layers", {}), data.get("meta", {}))
