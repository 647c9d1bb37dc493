"""Method options: declaration (`option`), validation with errors that name what is allowed, and
parsing from text (CLI, recipes, lm-eval `model_args`).

An option declared with `per_head=True` takes a float, one value per query head (a list / tuple /
1-D tensor, the same for every layer) or a per-(layer, head) table (a 2-D list or tensor, row `i`
for layer `i`); calibrated profiles fill those per (layer, head).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


@dataclass(frozen=True)
class Knob:
    """The per-head option that calibration searches for a method: its search range, which end keeps
    more keys (`denser`: "higher" or "lower"), and whether to step on a log scale."""

    option: str
    low: float
    high: float
    denser: str
    log: bool = False

    def __post_init__(self) -> None:
        if self.denser not in ("higher", "lower"):
            raise ValueError(f"Knob.denser must be 'higher' or 'lower', got {self.denser!r}")
        if not self.low < self.high or (self.log and self.low <= 0):
            raise ValueError(f"Knob range must satisfy 0 < low < high on a log scale, low < high otherwise; "
                             f"got {self.low}, {self.high}")

    def value(self, t: torch.Tensor) -> torch.Tensor:
        """The option's value at density coordinate `t` in [0, 1] (0: sparsest end, 1: densest end)."""
        u = t if self.denser == "higher" else 1 - t
        if self.log:
            return torch.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low)))
        return self.low + u * (self.high - self.low)

    def coord(self, value: torch.Tensor) -> torch.Tensor:
        """The inverse of `value`: the density coordinate of option values (clamped to [0, 1])."""
        value = torch.as_tensor(value, dtype=torch.float64)
        if self.log:
            u = (torch.log(value.clamp(min=self.low)) - math.log(self.low)) / (math.log(self.high) - math.log(self.low))
        else:
            u = (value - self.low) / (self.high - self.low)
        u = u.clamp(0.0, 1.0)
        return u if self.denser == "higher" else 1 - u


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
    per_head: bool = False

    def describe_allowed(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        parts = [self.type.__name__]
        if self.min is not None:
            parts.append(f">= {self.min}")
        if self.max is not None:
            parts.append(f"<= {self.max}")
        text = " ".join(parts)
        return f"{text} (or one such value per query head)" if self.per_head else text

    def _check_scalar(self, where: str, value: Any) -> Any:
        bad = f"option {self.name!r} of {where} must be {self.describe_allowed()}, got {value!r}"
        if self.type is bool:
            if not isinstance(value, bool):
                raise ValueError(f"{bad} ({type(value).__name__})")
            return value
        if self.type is int:
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{bad} ({type(value).__name__})")
            value = int(value)
        elif self.type is float:
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"{bad} ({type(value).__name__})")
            value = float(value)
            if math.isnan(value):
                raise ValueError(f"{bad} (NaN is not a value)")
        elif not isinstance(value, self.type):
            raise ValueError(f"{bad} ({type(value).__name__})")
        if self.choices is not None and value not in self.choices:
            raise ValueError(bad)
        if (self.min is not None and value < self.min) or (self.max is not None and value > self.max):
            raise ValueError(bad)
        return value

    def check(self, where: str, value: Any, heads: int | None = None) -> Any:
        """`value` converted to the option's type, or ValueError naming the option, `where` and what is
        allowed. Per-head options also take one value per query head (a tuple is returned) or a
        per-(layer, head) table (a tuple of tuples)."""
        if self.per_head and _is_table(value):
            return tuple(self.check(where, row, heads) for row in value)
        if self.per_head and _is_sequence(value):
            values = value.tolist() if isinstance(value, torch.Tensor) else list(value)
            if heads is not None and len(values) != heads:
                raise ValueError(
                    f"option {self.name!r} of {where} has {len(values)} per-head values; "
                    f"the layer has {heads} query heads"
                )
            return tuple(self._check_scalar(where, v) for v in values)
        return self._check_scalar(where, value)

    def parse(self, text: str, where: str = "") -> Any:
        """Convert a string (CLI, YAML scalar, lm-eval model_args) to the option's type, then check it."""
        if not isinstance(text, str):
            return self.check(where, text)
        s = text.strip()
        try:
            if self.type is bool:
                if s.lower() not in _TRUE + _FALSE:
                    raise ValueError
                value: Any = s.lower() in _TRUE
            elif self.type is int:
                value = int(s)
            elif self.type is float:
                value = float(s)
            else:
                value = self.type(s)
        except ValueError:
            raise ValueError(
                f"option {self.name!r} of {where} must be {self.describe_allowed()}, got {text!r}"
            ) from None
        return self.check(where, value)


def _is_table(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dim() == 2
    return _is_sequence(value) and len(value) > 0 and all(_is_sequence(v) for v in value)


def for_layer(value: Any, layer: int, layers: int, name: str) -> Any:
    """A per-(layer, head) table's row for `layer` (other values pass through)."""
    if not (isinstance(value, tuple) and value and isinstance(value[0], tuple)):
        return value
    if len(value) != layers:
        raise ValueError(f"option {name!r} has a table of {len(value)} layers; the model has {layers}")
    return value[layer]


def _is_sequence(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dim() == 1
    return isinstance(value, Sequence) and not isinstance(value, str)


def option(default: Any, help: str = "", *, min: float | None = None, max: float | None = None,
           choices: Sequence | None = None, per_head: bool = False):
    """Declare a method option as a dataclass field with validation metadata."""
    meta = {"help": help, "min": min, "max": max, "choices": choices, "per_head": per_head}
    return dataclasses.field(default=default, metadata=meta)


def option_specs(cls: type) -> tuple[OptionSpec, ...]:
    """The options a method dataclass declares (its init fields): the class's own in declaration order,
    then those it inherits (a base's shared options, e.g. `dense_tail`, come last)."""
    hints = typing.get_type_hints(cls)
    specs = []

    def declared_at(f: dataclasses.Field) -> int:
        return next(i for i, k in enumerate(cls.__mro__) if f.name in vars(k).get("__annotations__", {}))

    for f in sorted(dataclasses.fields(cls), key=declared_at):
        if not f.init:
            continue
        meta = f.metadata
        typ = hints[f.name]
        if typing.get_origin(typ) is not None:  # e.g. `float | tuple[float, ...]` for per-head options
            typ = next(a for a in typing.get_args(typ) if isinstance(a, type) and a in (int, float, bool, str))
        specs.append(OptionSpec(
            name=f.name, type=typ, default=f.default, help=meta.get("help", ""), min=meta.get("min"),
            max=meta.get("max"), choices=tuple(meta["choices"]) if meta.get("choices") else None,
            per_head=bool(meta.get("per_head", False)),
        ))
    return tuple(specs)


def resolved_options(method: Any) -> dict[str, Any]:
    """Every option of a built method as it runs, JSON-ready: defaults and derived values (e.g. a page size chosen
    from the budget) included. Benchmark rows keep it, since a spec string such as "recycled:budget=512" stops
    saying what ran once a default changes."""
    def plain(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.tolist()
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        return value

    return {spec.name: plain(getattr(method, spec.name)) for spec in option_specs(type(method))}


def per_head(value: float | Sequence[float], heads: int, device=None) -> torch.Tensor:
    """A per-head option as a `[heads]` float32 tensor (a float is broadcast)."""
    if isinstance(value, numbers.Real):
        return torch.full((heads,), float(value), dtype=torch.float32, device=device)
    t = torch.as_tensor(list(value), dtype=torch.float32, device=device)
    if t.numel() != heads:
        raise ValueError(f"expected {heads} per-head values, got {t.numel()}")
    return t
