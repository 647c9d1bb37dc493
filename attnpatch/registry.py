"""The method tables, one per phase: what the API, the CLI, the spec parser, the tests and the eval
read. Tables only: method modules register themselves here (`register_prefill` / `register_decode`).
This module depends on none of them: before the first lookup it imports the method packages named in
`METHOD_PACKAGES` by name, as a plugin loader would (an extension package can append its own)."""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from attnpatch.options import OptionSpec, option_specs

PHASES = ("prefill", "decode")


@dataclass(frozen=True)
class MethodInfo:
    """A registered method: name, phase, one-line description, class, options."""

    name: str
    phase: str
    description: str
    cls: type
    options: tuple[OptionSpec, ...]

    @property
    def option_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.options)

    def spec(self, name: str) -> OptionSpec:
        for o in self.options:
            if o.name == name:
                return o
        allowed = ", ".join(self.option_names) or "none"
        raise ValueError(f"unknown option {name!r} for {self.phase} method {self.name!r}; its options are: {allowed}")

    def check(self, options: Mapping[str, Any], heads: int | None = None, where: str = "") -> dict[str, Any]:
        """Validated, typed options (unknown names, wrong types, out-of-range or NaN values raise)."""
        where = f"{self.phase} method {self.name!r}{where}"
        return {k: self.spec(k).check(where, v, heads) for k, v in options.items()}

    def build(self, options: Mapping[str, Any] | None = None, heads: int | None = None, where: str = ""):
        """Instantiate the method with validated options."""
        return self.cls(**self.check(options or {}, heads, where))

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "phase": self.phase, "description": self.description,
                "options": {o.name: o.default for o in self.options}}


_TABLES: dict[str, dict[str, MethodInfo]] = {p: {} for p in PHASES}
METHOD_PACKAGES: list[str] = ["attnpatch.methods"]  # imported (by name) before the first lookup
_loaded: set[str] = set()


def _load_method_packages() -> None:
    for name in METHOD_PACKAGES:
        if name not in _loaded:
            _loaded.add(name)
            importlib.import_module(name)


def _register(phase: str, name: str):
    def wrap(cls: type) -> type:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{phase} method {name!r} must be a dataclass")
        doc = (cls.__doc__ or "").strip().splitlines()
        _TABLES[phase][name] = MethodInfo(name, phase, doc[0] if doc else "", cls, option_specs(cls))
        cls.name = name
        return cls

    return wrap


def register_prefill(name: str):
    """Class decorator: add a prefill method dataclass to the prefill table under `name`."""
    return _register("prefill", name)


def register_decode(name: str):
    """Class decorator: add a decode method dataclass to the decode table under `name`."""
    return _register("decode", name)


def get_method(name: str, phase: str) -> MethodInfo:
    """Look a method up in a phase's table; ValueError lists the methods allowed there."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    if not isinstance(name, str):
        raise ValueError(f"a {phase} method is named by a string, got {name!r}; see attnpatch.list_methods()")
    _load_method_packages()
    table = _TABLES[phase]
    if name in table:
        return table[name]
    allowed = ", ".join(sorted(table))
    other = "decode" if phase == "prefill" else "prefill"
    if name in _TABLES[other]:
        arg = "decode=" if other == "decode" else "method="
        raise ValueError(f"{name!r} is a {other} method, not a {phase} method (pass it as {arg}{name!r}); "
                         f"available {phase} methods: {allowed}")
    raise ValueError(f"unknown {phase} method {name!r}; available {phase} methods: {allowed}")


def method_infos(phase: str | None = None) -> list[MethodInfo]:
    """Every registered method of a phase (both phases when None), prefill first."""
    phases = PHASES if phase is None else (phase,)
    _load_method_packages()
    return [info for p in phases for info in _TABLES[p].values()]


def list_methods(phase: str | None = None) -> list[dict[str, Any]]:
    """Every registered method: name, phase, one-line description, options with defaults."""
    return [m.as_dict() for m in method_infos(phase)]
