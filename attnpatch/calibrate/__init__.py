"""Calibration: fit a method's per-head option for one checkpoint on a few prompts and save it as a
`Profile` (issue 11). `calibrate(model, tokenizer, method, ...)`; `attnpatch calibrate` on the CLI.
`hess(model, tokenizer, method, density=...)`: HeSS per-head budgets at a fixed average density
(`attnpatch calibrate --hess --density D`)."""

from attnpatch.calibrate.hess import hess, hess_measure
from attnpatch.calibrate.run import calibrate

__all__ = ["calibrate", "hess", "hess_measure"]
