"""What calibration aims at: an output-error tolerance, a density, or a task-accuracy floor."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

KINDS = {
    "error": "relative attention-output error per head",
    "density": "kept share of the causal key blocks per head",
    "accuracy": "held-out passkey score as a share of the dense model's",
}
_RANGE = {"error": "in (0, 1)", "density": "in (0, 1]", "accuracy": "in (0, 1]"}
_LABEL = {"error": "err", "density": "den", "accuracy": "acc"}


@dataclass(frozen=True)
class Target:
    """One calibration target: `kind` ("error", "density" or "accuracy") and its value."""

    kind: str
    value: float

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown calibration target {self.kind!r}; allowed: "
                             + "; ".join(f"{k} ({v}, {_RANGE[k]})" for k, v in KINDS.items()))
        v = self.value
        if isinstance(v, bool) or not isinstance(v, int | float) or math.isnan(v):
            raise ValueError(f"the {self.kind} target must be a number, got {v!r}")
        ok = 0 < v < 1 if self.kind == "error" else 0 < v <= 1
        if not ok:
            raise ValueError(f"the {self.kind} target ({KINDS[self.kind]}) must be {_RANGE[self.kind]}, got {v}")

    @property
    def label(self) -> str:
        """`err0.05`, `den0.3`, `acc0.9`: for profile and file names."""
        return f"{_LABEL[self.kind]}{self.value:g}"

    @classmethod
    def parse(cls, value: Any) -> Target:
        """A Target, a float (an error tolerance), "error=0.05" / "density=0.3" / "accuracy=0.9", or a
        one-entry mapping `{"density": 0.3}`."""
        if isinstance(value, Target):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return cls("error", float(value))
        if isinstance(value, Mapping) and len(value) == 1:
            kind, number = next(iter(value.items()))
            return cls(str(kind), _number(number, str(kind)))
        if isinstance(value, str) and "=" in value:
            kind, _, number = value.partition("=")
            return cls(kind.strip(), _number(number, kind.strip()))
        raise ValueError(f"a calibration target is error=X, density=X or accuracy=X (or a float: an error "
                         f"tolerance), got {value!r}")


def _number(text: Any, kind: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        raise ValueError(f"the {kind} target must be a number, got {text!r}") from None


def resolve_target(target: Any = None, target_error: float | None = None) -> Target:
    """The one target from `calibrate`'s `target=` or its older `target_error=` (default error 0.05)."""
    if target is not None and target_error is not None:
        raise ValueError("give target= or target_error=, not both")
    if target is None:
        return Target("error", 0.05 if target_error is None else target_error)
    return Target.parse(target)
