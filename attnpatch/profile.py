"""Profile: per-layer (and per-head) method parameters tied to one checkpoint, stored as JSON (never pickle).

A profile names, per layer, a prefill `method` and/or `decode` method and their options; an option
declared per head takes one value per query head. It carries the fingerprint of the checkpoint it
was made for: the architecture (model type, layers, heads, sizes) and a hash of the weights. A
profile for another architecture is refused; one for other weights of the same architecture (a
fine-tune) is refused unless the caller says so (`allow_other_weights=True`).

Storage: one JSON file (name, fingerprint, meta, layers). When its per-head tables are large (more
than `TENSOR_THRESHOLD` numbers in all, or `save(..., tensors="always")`), every per-head list goes to
a safetensors file next to it (`NAME.safetensors`, one float64 tensor per layer and option) and the
JSON holds `{"tensor": KEY}` in its place plus the file's name and sha256; `Profile.load` reads both.

Run-time scaling (`adjusted`): `shift` moves every head's knob value along the knob's calibration
coordinate t ∈ [0, 1] (0 = its sparsest value, 1 = its densest; linear in the value for thresholds,
γ and θ, in log for τ and BLASST's a), clamped to the knob's range: +0.1 is denser, −0.1 sparser.
`sparsity` (profiles with a(S) tables: BLASST's fit) sets each phase's `a` to the fitted a(S) for
skipped share S, interpolated in log a between the table's shares (outside them is an error).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from attnpatch.options import Knob

ARCH_FIELDS = ("model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size",
               "head_dim")
_FILE_KEYS = ("name", "fingerprint", "config_hash", "meta", "layers", "tensors")
TENSOR_THRESHOLD = 4096  # per-head numbers above which `save` writes them to safetensors
_OPTION_DICTS = ("prefill_options", "decode_options")
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
    """A short hash of the weights: every parameter's name, shape and a strided sample of at most 1024
    of its values rounded to bfloat16 (cheap on an 8B model; any fine-tune changes it). The same
    checkpoint loaded in float32 (CPU) or bfloat16 (GPU) hashes the same, so a profile calibrated on
    one runs on the other; a float16 load rounds differently and needs `allow_other_weights`."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        h.update(f"{name}:{tuple(p.shape)}".encode())
        if p.device.type == "meta" or p.numel() == 0:
            continue
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // _SAMPLES_PER_TENSOR)][:_SAMPLES_PER_TENSOR]
        h.update(sample.to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes())
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
            f"{arch.get('num_key_value_heads')} heads, hidden {arch.get('hidden_size')}, "
            f"head dim {arch.get('head_dim')})")


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

    def save(self, path: str | Path, tensors: str = "auto") -> Path | None:
        """Write the profile as JSON at `path`; with `tensors="always"` (or "auto" and large tables) its
        per-head lists go to `path` with suffix `.safetensors` (returned), with "never" all stay in JSON."""
        if tensors not in ("auto", "always", "never"):
            raise ValueError(f"tensors must be 'auto', 'always' or 'never', got {tensors!r}")
        path = Path(path)
        if path.suffix == ".safetensors":
            raise ValueError(f"a profile is saved as JSON (its large tables go next to it); got {path}")
        layers = {str(k): copy.deepcopy(v) for k, v in sorted(self.layers.items())}
        lists = [(f"layers.{i}.{'.'.join(where)}", holder, key) for i, entry in layers.items()
                 for where, holder, key in _per_head_lists(entry)]
        numbers = sum(len(holder[key]) for _, holder, key in lists)
        side = None
        data: dict[str, Any] = {"name": self.name, "fingerprint": self.fingerprint, "meta": self.meta}
        if lists and (tensors == "always" or (tensors == "auto" and numbers > TENSOR_THRESHOLD)):
            from safetensors.torch import save_file

            side = path.with_suffix(".safetensors")
            table = {}
            for name, holder, key in lists:
                table[name] = torch.tensor([float(x) for x in holder[key]], dtype=torch.float64)
                holder[key] = {"tensor": name}
            save_file(table, str(side))
            data["tensors"] = {"file": side.name, "sha256": hashlib.sha256(side.read_bytes()).hexdigest()}
        data["layers"] = layers
        path.write_text(json.dumps(data, indent=2))
        return side

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        """Read a profile JSON (and its safetensors tables, if it names them)."""
        path = Path(path)
        if path.suffix == ".safetensors":
            raise ValueError(f"{path} holds a profile's tables; load the profile JSON that names it")
        if not path.is_file():
            raise FileNotFoundError(f"profile file {path} does not exist")
        data = json.loads(path.read_text())
        unknown = set(data) - set(_FILE_KEYS)
        if unknown:
            raise ValueError(f"profile {path} has unknown keys {sorted(unknown)}; allowed: {', '.join(_FILE_KEYS)}")
        fingerprint = data.get("fingerprint")
        if fingerprint is None and data.get("config_hash"):  # files written before fingerprints
            fingerprint = {"architecture_hash": data["config_hash"]}
        layers = data.get("layers", {})
        if data.get("tensors"):
            layers = _resolve_tensors(path, data["tensors"], layers)
        return cls(data.get("name", ""), fingerprint, layers, data.get("meta", {}))

    # -- run-time scaling ------------------------------------------------------------------------
    def adjusted(self, shift: float = 0.0, sparsity: float | None = None, knob: Knob | None = None) -> Profile:
        """A copy with the knob moved by `shift` and/or BLASST's a set for skipped share `sparsity`
        (module docstring); `knob` defaults to the one recorded in `meta["knob_range"]`."""
        if not shift and sparsity is None:
            return self
        out = Profile(self.name, self.fingerprint, copy.deepcopy(self.layers), copy.deepcopy(self.meta))
        if sparsity is not None:
            _set_sparsity(out, sparsity)
        if shift:
            _shift(out, shift, knob)
        out.meta["adjusted"] = {"shift": shift, "sparsity": sparsity}
        return out


def _per_head_lists(entry: dict[str, Any]):
    """(path, holder, key) of every list value of a profile layer entry (flat or in an options dict)."""
    for key, value in entry.items():
        if key in _OPTION_DICTS and isinstance(value, dict):
            for name, v in value.items():
                if _numbers(v):
                    yield (key, name), value, name
        elif _numbers(value):
            yield (key,), entry, key


def _numbers(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(x, int | float) and not isinstance(x, bool) for x in value)


def _resolve_tensors(path: Path, info: Any, layers: dict) -> dict:
    if not isinstance(info, dict) or "file" not in info:
        raise ValueError(f"profile {path}: 'tensors' must name its safetensors file ({{'file': ..., 'sha256': ...}})")
    side = path.parent / info["file"]
    if not side.is_file():
        raise FileNotFoundError(f"profile {path} keeps its tables in {side}, which does not exist")
    raw = side.read_bytes()
    if info.get("sha256") and hashlib.sha256(raw).hexdigest() != info["sha256"]:
        raise ValueError(f"{side} is not the tables file profile {path} was saved with (sha256 differs)")
    from safetensors.torch import load as load_tensors

    table = load_tensors(raw)

    def fill(value: Any) -> Any:
        if isinstance(value, dict) and set(value) == {"tensor"}:
            if value["tensor"] not in table:
                raise ValueError(f"profile {path} names tensor {value['tensor']!r}, missing from {side}")
            return table[value["tensor"]].tolist()
        if isinstance(value, dict):
            return {k: fill(v) for k, v in value.items()}
        return value

    return {k: fill(v) for k, v in layers.items()} if isinstance(layers, dict) else layers


def _shift(profile: Profile, shift: float, knob: Knob | None) -> None:
    if isinstance(shift, bool) or not isinstance(shift, int | float) or not -1 <= shift <= 1:
        raise ValueError(f"profile_shift must be a number in [-1, 1] (+: denser), got {shift!r}")
    name = profile.meta.get("knob")
    if knob is None and isinstance(profile.meta.get("knob_range"), dict):
        knob = Knob(name, **profile.meta["knob_range"])
    if knob is None or not name:
        raise ValueError(f"profile {profile.name!r} records no calibrated knob: profile_shift needs a profile made "
                         "by attnpatch calibrate")
    for entry in profile.layers.values():
        holders = [entry] + ([entry["prefill_options"]] if isinstance(entry.get("prefill_options"), dict) else [])
        for holder in holders:
            if name in holder:
                values = torch.as_tensor(holder[name], dtype=torch.float64)
                moved = knob.value((knob.coord(values) + shift).clamp(0.0, 1.0))
                holder[name] = moved.tolist()


def _interpolate(table: list, share: float, phase: str, name: str) -> float:
    rows = sorted((float(s), float(a)) for s, a in table)
    if not rows or not rows[0][0] <= share <= rows[-1][0]:
        span = f"[{rows[0][0]}, {rows[-1][0]}]" if rows else "(empty)"
        raise ValueError(f"profile {name!r}: profile_sparsity {share} is outside its {phase} a(S) table {span}")
    for (s0, a0), (s1, a1) in zip(rows, rows[1:], strict=False):
        if s0 <= share <= s1:
            w = 0.0 if s1 == s0 else (share - s0) / (s1 - s0)
            return math.exp(math.log(max(a0, 1e-30)) + w * (math.log(max(a1, 1e-30)) - math.log(max(a0, 1e-30))))
    return rows[0][1]


def _set_sparsity(profile: Profile, share: float) -> None:
    if isinstance(share, bool) or not isinstance(share, int | float) or not 0 < share < 1:
        raise ValueError(f"profile_sparsity must be a skipped share in (0, 1), got {share!r}")
    tables = profile.meta.get("a_of_s")
    if not isinstance(tables, dict) or not tables:
        raise ValueError(f"profile {profile.name!r} has no a(S) table (only BLASST λ fits carry one); "
                         "use profile_shift to move a knob profile denser or sparser")
    for phase, table in tables.items():
        a = _interpolate(table, share, phase, profile.name)
        key = "prefill_options" if phase == "prefill" else "decode_options"
        for entry in profile.layers.values():
            if isinstance(entry.get(key), dict) and "a" in entry[key]:
                entry[key]["a"] = a
