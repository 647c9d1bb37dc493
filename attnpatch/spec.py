"""`PatchSpec`: what a patch runs — a prefill method and its options, a decode method and its
options, a profile and a backend — with one parser for every way users say it:

* Python: `PatchSpec.build(method="a_shape", decode="streaming", local_blocks=4, window=256)`
  (a flat option goes to the one method that declares it; one declared by both is an error that
  names `prefill_options=` / `decode_options=`);
* strings (CLI, recipes): `"xattention:threshold=0.9,block_size=64"` — a method and its options;
* dicts / YAML: `{"method": "a_shape:local_blocks=4", "decode": {"name": "streaming",
  "options": {"window": 256}}, "backend": "auto", "profile": "p.json"}`;
* lm-eval `model_args`: `method=blasst,a=128,decode=streaming,window=512,attn_backend=triton`
  (`prefill.X=` / `decode.X=` name the phase of an option both methods declare).

A profile can be scaled at run time without recalibrating (`Profile.adjusted`): `profile_shift`
(in [-1, 1]) moves each head's calibrated knob along its calibration coordinate (+ denser, − sparser);
`profile_sparsity` (in (0, 1), profiles with a(S) tables: BLASST) sets `a` per phase for that skipped share.

Values given as text are converted to each option's declared type; every value is validated
against the method table (unknown names, wrong types, ranges, NaN).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from attnpatch.backends import BACKEND_NAMES, UNGATED_AUTO
from attnpatch.profile import Profile
from attnpatch.registry import MethodInfo, get_method

SPEC_KEYS = ("method", "prefill", "decode", "prefill_options", "decode_options", "options", "profile", "backend",
             "allow_other_weights", "profile_shift", "profile_sparsity")
MODEL_ARG_KEYS = ("method", "decode", "profile", "attn_backend", "allow_other_weights", "profile_shift",
                  "profile_sparsity")


def _typed(info: MethodInfo, options: Mapping[str, Any]) -> dict[str, Any]:
    """Options converted from text where given as text, then validated."""
    where = f"{info.phase} method {info.name!r}"
    out = {}
    for key, value in options.items():
        spec = info.spec(key)
        out[key] = spec.parse(value, where) if isinstance(value, str) and spec.type is not str else \
            spec.check(where, value)
    return out


def parse_method(text: str, phase: str = "prefill") -> tuple[str, dict[str, str]]:
    """`"name:key=value,key=value"` → `(name, {key: value-as-text})`; the name is checked in `phase`'s table."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"a {phase} method must be a name like 'a_shape' or 'a_shape:local_blocks=4', got {text!r}")
    name, _, rest = text.strip().partition(":")
    info = get_method(name.strip(), phase)
    options: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"option {part!r} of {phase} method {info.name!r} must look like key=value")
        options[key.strip()] = value.strip()
    return info.name, options


def _method_entry(value: Any, phase: str) -> tuple[str, dict[str, Any]]:
    """A method given as a name, a "name:k=v" string or {"name": ..., "options": {...}}."""
    if isinstance(value, Mapping):
        unknown = set(value) - {"name", "options"}
        if unknown or "name" not in value:
            raise ValueError(f"a {phase} method given as a mapping needs 'name' and may have 'options'; "
                             f"got keys {sorted(value)}")
        name, options = parse_method(value["name"], phase)
        return name, {**options, **dict(value.get("options") or {})}
    return parse_method(value, phase)


def route_options(prefill: MethodInfo, decode: MethodInfo, options: Mapping[str, Any]) -> tuple[dict, dict]:
    """Send each flat option to the one method that declares it. Unknown options name the allowed
    ones; an option both methods declare must be given per phase."""
    pre, dec = {}, {}
    pre_names, dec_names = set(prefill.option_names), set(decode.option_names)
    for key, value in options.items():
        if key.startswith("prefill."):
            pre[key.removeprefix("prefill.")] = value
        elif key.startswith("decode."):
            dec[key.removeprefix("decode.")] = value
        elif key in pre_names and key in dec_names:
            raise ValueError(
                f"option {key!r} is declared by both prefill method {prefill.name!r} and decode method "
                f"{decode.name!r}: pass it as prefill_options={{{key!r}: ...}} or decode_options={{{key!r}: ...}}"
            )
        elif key in pre_names:
            pre[key] = value
        elif key in dec_names:
            dec[key] = value
        else:
            allowed = sorted(pre_names | dec_names)
            raise ValueError(
                f"unknown option {key!r} for method={prefill.name!r}, decode={decode.name!r}; "
                f"allowed options: {', '.join(allowed) if allowed else 'none'}"
            )
    return pre, dec


@dataclass(frozen=True)
class PatchSpec:
    """A prefill method + options, a decode method + options, an optional profile, a backend."""

    method: str = "dense"
    decode: str = "dense"
    prefill_options: dict[str, Any] = field(default_factory=dict)
    decode_options: dict[str, Any] = field(default_factory=dict)
    profile: Profile | None = None
    backend: str | dict[str, str] = "auto"
    allow_other_weights: bool = False  # use a profile made for other weights of this architecture
    profile_shift: float = 0.0  # move the profile's knob: + denser, − sparser (Profile.adjusted)
    profile_sparsity: float | None = None  # BLASST profiles: a(S) for this skipped share

    @classmethod
    def build(cls, method: str = "dense", decode: str | None = None, *, prefill_options: Mapping | None = None,
              decode_options: Mapping | None = None, profile: Profile | str | Path | None = None,
              backend: str | Mapping[str, str] = "auto", allow_other_weights: bool = False,
              profile_shift: float | str = 0.0, profile_sparsity: float | str | None = None,
              **options: Any) -> PatchSpec:
        """From Python arguments (see the module docstring). Methods may carry options as "name:k=v"."""
        if method is None:
            method = "dense"
        pre_name, pre_inline = _method_entry(method, "prefill")
        dec_name, dec_inline = _method_entry(decode if decode is not None else "dense", "decode")
        pre_info, dec_info = get_method(pre_name, "prefill"), get_method(dec_name, "decode")
        pre_flat, dec_flat = route_options(pre_info, dec_info, options)
        for name, given in (("prefill_options", prefill_options), ("decode_options", decode_options)):
            if given is not None and not isinstance(given, Mapping):
                raise ValueError(f"{name} must be a dict of option values, got {type(given).__name__}")
        pre = _typed(pre_info, {**pre_inline, **pre_flat, **dict(prefill_options or {})})
        dec = _typed(dec_info, {**dec_inline, **dec_flat, **dict(decode_options or {})})
        if not isinstance(allow_other_weights, bool):
            raise ValueError(f"allow_other_weights must be True or False, got {allow_other_weights!r}")
        shift, share = _number("profile_shift", profile_shift), _number("profile_sparsity", profile_sparsity)
        spec = cls(pre_name, dec_name, pre, dec, _profile(profile), _backend(backend), allow_other_weights,
                   0.0 if shift is None else shift, share)
        spec.effective_profile()  # scaling errors surface here, before any model loads
        return spec

    @classmethod
    def parse(cls, value: PatchSpec | str | Mapping[str, Any]) -> PatchSpec:
        """A spec from a "method:k=v" string (prefill only) or a dict / YAML mapping (keys: method or
        prefill, decode, prefill_options, decode_options, options (flat), profile, backend)."""
        if isinstance(value, PatchSpec):
            return value
        if isinstance(value, str):
            return cls.build(value)
        if not isinstance(value, Mapping):
            raise ValueError(f"a patch spec is a string or a mapping, got {type(value).__name__}")
        unknown = set(value) - set(SPEC_KEYS)
        if unknown:
            raise ValueError(f"unknown patch spec key(s) {sorted(unknown)}; allowed: {', '.join(SPEC_KEYS)}")
        if "method" in value and "prefill" in value:
            raise ValueError("give the prefill method as 'method' or 'prefill', not both")
        flat = value.get("options") or {}
        if not isinstance(flat, Mapping):
            raise ValueError(f"'options' must be a mapping, got {type(flat).__name__}")
        return cls.build(value.get("method", value.get("prefill", "dense")), value.get("decode"),
                         prefill_options=value.get("prefill_options"), decode_options=value.get("decode_options"),
                         profile=value.get("profile"), backend=value.get("backend", "auto"),
                         allow_other_weights=value.get("allow_other_weights", False),
                         profile_shift=value.get("profile_shift", 0.0),
                         profile_sparsity=value.get("profile_sparsity"), **flat)

    @classmethod
    def from_model_args(cls, args: Mapping[str, Any]) -> tuple[PatchSpec, dict[str, Any]]:
        """Split lm-eval `model_args` into a spec (method, decode, profile, attn_backend, the methods'
        options, `prefill.X` / `decode.X`) and the arguments left for the harness's HFLM."""
        args = dict(args)
        method = args.pop("method", "dense")
        decode = args.pop("decode", None)
        profile = args.pop("profile", None)
        backend = args.pop("attn_backend", "auto")
        other = args.pop("allow_other_weights", False)
        shift, share = args.pop("profile_shift", 0.0), args.pop("profile_sparsity", None)
        if isinstance(other, str):
            other = other.strip().lower() in ("true", "1", "yes")
        pre_info = get_method(_method_entry(method, "prefill")[0], "prefill")
        dec_info = get_method(_method_entry(decode or "dense", "decode")[0], "decode")
        names = set(pre_info.option_names) | set(dec_info.option_names)
        options = {k: args.pop(k) for k in list(args)
                   if k in names or k.startswith(("prefill.", "decode."))}
        return cls.build(method, decode, profile=profile, backend=backend, allow_other_weights=other,
                         profile_shift=shift, profile_sparsity=share, **options), args

    def effective_profile(self) -> Profile | None:
        """The profile as patches use it: scaled by `profile_shift` / `profile_sparsity` where given."""
        if self.profile is None:
            if self.profile_shift or self.profile_sparsity is not None:
                raise ValueError("profile_shift and profile_sparsity scale a profile; give profile= too")
            return None
        knob = None
        made_for = self.profile.meta.get("method")
        if self.profile_shift and made_for and "knob_range" not in self.profile.meta:
            knob = getattr(get_method(made_for, "prefill").cls, "knob", None)  # profiles older than knob_range
        return self.profile.adjusted(self.profile_shift, self.profile_sparsity, knob)

    def for_evaluation(self) -> PatchSpec:
        """This spec as an evaluation runs it: a prefill backend "auto" becomes "sparse" ("auto" without
        its speed gate, which on CUDA runs a prefill dense where dense was measured faster), so that
        the scores are the method's own. Explicit backends are kept."""
        if isinstance(self.backend, str):
            backend = UNGATED_AUTO if self.backend == "auto" else self.backend
        else:
            backend = {**self.backend, "prefill": UNGATED_AUTO} if self.backend.get("prefill", "auto") == "auto" \
                else dict(self.backend)
        return replace(self, backend=backend)

    def build_decode(self):
        """The spec's decode method, built with its options (defaults and derived values filled in): what a
        patch of this spec runs in each full-attention layer (no per-layer profile override)."""
        return get_method(self.decode, "decode").build(dict(self.decode_options))

    @property
    def is_dense(self) -> bool:
        return self.method == "dense" and self.decode == "dense" and self.profile is None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (the profile by name and fingerprint)."""
        out = {"method": self.method, "prefill_options": dict(self.prefill_options), "decode": self.decode,
               "decode_options": dict(self.decode_options), "backend": self.backend,
               "profile": None if self.profile is None else self.profile.describe()}
        if self.profile_shift:
            out["profile_shift"] = self.profile_shift
        if self.profile_sparsity is not None:
            out["profile_sparsity"] = self.profile_sparsity
        return out

    def __str__(self) -> str:
        def one(name: str, opts: Mapping) -> str:
            return name + (":" + ",".join(f"{k}={v}" for k, v in opts.items()) if opts else "")

        text = f"{one(self.method, self.prefill_options)} + decode {one(self.decode, self.decode_options)}"
        if self.profile is not None:
            text += f" + profile {self.profile.name or '(unnamed)'}"
            if self.profile_shift:
                text += f" shifted {self.profile_shift:+g}"
            if self.profile_sparsity is not None:
                text += f" at sparsity {self.profile_sparsity:g}"
        return text + ("" if self.backend == "auto" else f" on {self.backend}")


def _number(name: str, value: Any) -> float | None:
    """A float from a number or its text (YAML, lm-eval model_args); None stays None."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if math.isnan(number):
        raise ValueError(f"{name} must be a number, got NaN")
    return number


def _profile(profile: Profile | str | Path | None) -> Profile | None:
    if profile is None or isinstance(profile, Profile):
        return profile
    if isinstance(profile, str | Path):
        return Profile.load(profile)
    raise ValueError(f"profile must be an attnpatch.Profile, a path to a profile JSON, or None; "
                     f"got {type(profile).__name__}")


def _backend(backend: str | Mapping[str, str]) -> str | dict[str, str]:
    if isinstance(backend, Mapping):
        unknown = set(backend) - {"prefill", "decode"}
        if unknown:
            raise ValueError(f"backend mapping keys must be 'prefill' and/or 'decode', got {sorted(unknown)}")
        for phase, name in backend.items():
            if name not in BACKEND_NAMES:
                raise ValueError(f"unknown {phase} backend {name!r}; allowed: {', '.join(BACKEND_NAMES)}")
        return dict(backend)
    if backend not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {backend!r}; allowed: {', '.join(BACKEND_NAMES)}")
    return backend
