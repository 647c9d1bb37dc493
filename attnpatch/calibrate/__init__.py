"""Calibration: fit a method's per-head option for one checkpoint on a few prompts and save it as a
`Profile` (issue 11). `calibrate(model, tokenizer, method, ...)`; `attnpatch calibrate` on the CLI."""

from attnpatch.calibrate.run import calibrate

__all__ = ["calibrate"]
