"""A method's answers against a reference's (dense decoding) on the same prompts.

Two accuracies over the same prompts differ only where one answers and the other does not: the lost prompts
(the reference right, the method wrong) and the won ones. McNemar's exact test asks how likely a split of those
prompts at least as uneven as the one seen is, were each as likely to go either way: 4 lost and none won gives
p = 0.125, so a 4-point gap over 100 prompts is not yet evidence that the method answers worse.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from math import comb


def sign_test(lost: int, won: int) -> float:
    """Two-sided exact sign test (McNemar's exact test) on `lost` + `won` discordant prompts: the chance of a
    split at least as uneven under p = 1/2 (1.0 without discordant prompts)."""
    if lost < 0 or won < 0:
        raise ValueError(f"sign_test: counts must be >= 0, got lost={lost}, won={won}")
    n, fewer = lost + won, min(lost, won)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(comb(n, i) for i in range(fewer + 1)) / 2 ** n)


@dataclass(frozen=True)
class Paired:
    """The prompts a method loses and wins against the reference (by the prompts' ids) and the sign test's p."""

    lost: tuple[int, ...]
    won: tuple[int, ...]

    @property
    def p_value(self) -> float:
        return sign_test(len(self.lost), len(self.won))

    def summary(self) -> str:
        """E.g. `lost 4 / won 0 (p 0.12)`: prompts lost / won against the reference, and the sign test's p."""
        return f"lost {len(self.lost)} / won {len(self.won)} (p {self.p_value:.2f})"


def paired(reference: Sequence[bool], other: Sequence[bool], ids: Sequence[int] | None = None) -> Paired:
    """Compare per-prompt correctness of `other` with `reference` (same prompts, same order); `ids` name the
    prompts (default 0, 1, ...)."""
    if len(reference) != len(other):
        raise ValueError(f"paired: the two runs must score the same prompts, got {len(reference)} and {len(other)}")
    ids = list(range(len(reference))) if ids is None else list(ids)
    if len(ids) != len(reference):
        raise ValueError(f"paired: {len(ids)} ids for {len(reference)} prompts")
    lost = tuple(i for i, r, o in zip(ids, reference, other, strict=True) if r and not o)
    won = tuple(i for i, r, o in zip(ids, reference, other, strict=True) if o and not r)
    return Paired(lost, won)
