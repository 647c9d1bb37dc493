"""McNemar's exact test on paired per-prompt answers (`attnpatch.eval.paired`)."""

from __future__ import annotations

from math import comb

import pytest

from attnpatch.eval.paired import paired, sign_test


@pytest.mark.parametrize("lost, won", [(0, 0), (4, 0), (0, 4), (2, 0), (6, 1), (5, 5), (10, 2), (30, 12)])
def test_sign_test_is_the_two_sided_binomial_tail(lost, won):
    """The chance, under p = 1/2, of a split of the discordant prompts at least as uneven as the one seen,
    summed over both tails by enumerating every split."""
    n = lost + won
    seen = abs(lost - won)
    tail = sum(comb(n, k) for k in range(n + 1) if abs(2 * k - n) >= seen) / 2 ** n if n else 1.0
    assert sign_test(lost, won) == pytest.approx(tail)
    assert sign_test(lost, won) == sign_test(won, lost)


def test_four_lost_none_won_is_not_yet_evidence():
    assert sign_test(4, 0) == pytest.approx(0.125)
    assert sign_test(7, 0) < 0.05


def test_paired_names_the_prompts_by_their_ids():
    found = paired([True, True, False, True], [False, True, True, True], ids=[15, 34, 69, 73])
    assert found.lost == (15,) and found.won == (69,)
    assert found.p_value == 1.0
    assert found.summary() == "lost 1 / won 1 (p 1.00)"


def test_bad_input_is_refused_with_what_is_wrong():
    with pytest.raises(ValueError, match="same prompts"):
        paired([True], [True, False])
    with pytest.raises(ValueError, match="ids"):
        paired([True], [False], ids=[1, 2])
    with pytest.raises(ValueError, match=">= 0"):
        sign_test(-1, 2)
