"""One method table for the API, the CLI, the tests and the eval; option validation with helpful errors."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

PHASES = ("prefill", "decode")


@dataclass(frozen=True)
class OptionSpec:
    """One option of a method: name, type, default, allowed range or choices, help text."""

    name: str
    type: type
    default: Any
    help: str = ""
    min: float | None = None
    max: float | None = None
    choices: tuple | None = None

    def describe_allowed(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        parts = [self.type.__name__]
        if self.min is not None:
            parts.append(f">= {self.min}")
        if self.max is not None:
            parts.append(f"<= {self.max}")
        return " ".join(parts)

    def check(self, method: str, value: Any) -> Any:
        """Return `value` converted to the option's type, or raise ValueError naming what is allowed."""
        ok_type = (
            isinstance(value, bool)
            if self.type is bool
            else isinstance(value, self.type) and not isinstance(value, bool)
            or (self.type is float and isinstance(value, int) and not isinstance(value, bool))
        )
        if not ok_type:
            raise ValueError(
                f"option {self.name!r} of method {method!r} must be {self.describe_allowed()}, "
                f"got {value!r} ({type(value).__name__})"
            )
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"option {self.name!r} of method {method!r} must be {self.describe_allowed()}, got {value!r}")
        if (self.min is not None and value < self.min) or (self.max is not None and value > self.max):
            raise ValueError(f"option {self.name!r} of method {method!r} must be {self.describe_allowed()}, got {value!r}")
        return float(value) if self.type is float else value


def option(default: Any, help: str = "", *, min: float | None = None, max: float | None = None, choices=None):
    """Declare a method option as a dataclass field with validation metadata."""
    return dataclasses.field(default=default, metadata={"help": help, "min": min, "max": max, "choices": choices})


@dataclass(frozen=True)
class MethodInfo:
    name: str
    phases: tuple[str, ...]
    description: str
    cls: type
    options: tuple[OptionSpec, ...]

    def build(self, **options: Any):
        """Instantiate the method with validated options."""
        specs = {o.name: o for o in self.options}
        for key in options:
            if key not in specs:
                allowed = ", ".join(specs) or "none"
                raise ValueError(f"unknown option {key!r} for method {self.name!r}; its options are: {allowed}")
        values = {k: specs[k].check(self.name, v) for k, v in options.items()}
        return self.cls(**values)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "phase": "+".join(self.phases),
            "description": self.description,
            "options": {o.name: o.default for o in self.options},
        }


_METHODS: dict[str, MethodInfo] = {}


def _option_specs(cls: type) -> tuple[OptionSpec, ...]:
    hints = typing.get_type_hints(cls)
    specs = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        meta = f.metadata
        specs.append(
            OptionSpec(
                name=f.name,
                type=hints[f.name],
                default=f.default,
                help=meta.get("help", ""),
                min=meta.get("min"),
                max=meta.get("max"),
                choices=tuple(meta["choices"]) if meta.get("choices") else None,
            )
        )
    return tuple(specs)


def register_method(name: str, phases: tuple[str, ...] | str):
    """Class decorator: add a method dataclass to the table under `name` for the given phase(s)."""
    phases = (phases,) if isinstance(phases, str) else tuple(phases)
    for p in phases:
        if p not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {p!r}")

    def wrap(cls: type) -> type:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"method {name!r} must be a dataclass")
        doc = (cls.__doc__ or "").strip().splitlines()
        _METHODS[name] = MethodInfo(name, phases, doc[0] if doc else "", cls, _option_specs(cls))
        cls.name = name
        return cls

    return wrap


def _ensure_loaded() -> None:
    import attnpatch.methods  # noqa: F401  (registers the built-in methods)


def get_method(name: str, phase: str) -> MethodInfo:
    """Look a method up for a phase; ValueError lists the methods allowed there."""
    _ensure_loaded()
    info = _METHODS.get(name)
    allowed = sorted(n for n, m in _METHODS.items() if phase in m.phases)
    if info is None:
        raise ValueError(f"unknown {phase} method {name!r}; available {phase} methods: {', '.join(allowed)}")
    if phase not in info.phases:
        other = "decode=" if "decode" in info.phases else "method="
        raise ValueError(
            f"{name!r} is a {'/'.join(info.phases)} method, not a {phase} method (pass it as {other}{name!r}); "
            f"available {phase} methods: {', '.join(allowed)}"
        )
    return info


def list_methods() -> list[dict[str, Any]]:
    """Every registered method: name, phase, one-line description, options with defaults."""
    _ensure_loaded()
    return [m.as_dict() for m in _METHODS.values()]


def method_infos() -> list[MethodInfo]:
    _ensure_loaded()
    return list(_METHODS.values())
