"""The paired statistics against cases worked out by hand (t quantiles from a printed table, t with
2 degrees of freedom from its closed-form distribution function)."""

from __future__ import annotations

import math

import pytest

from kdhar.stats import (
    EQUIVALENT,
    HELPS,
    HURTS,
    INCONCLUSIVE,
    adjust,
    compare,
    decide,
    holm,
    seeds_for_halfwidth,
    seeds_for_power,
    seeds_note,
    sign_flip_p,
    smallest_sign_flip_p,
    t_interval,
    tost_p,
)


def t2_cdf(t: float) -> float:
    """Student-t distribution function with 2 degrees of freedom: 1/2 + t / (2·√(2 + t²))."""
    return 0.5 + t / (2 * math.sqrt(2 + t * t))


@pytest.mark.parametrize(("diffs", "p"), [
    # All 3 positive: of the 8 sign assignments only +++ and --- reach |sum| 6 -> 2/8.
    ([1.0, 2.0, 3.0], 0.25),
    # 5 positive: 2/32, the smallest p five pairs can give (so five pairs never reach p < 0.05).
    ([1.0, 2.0, 3.0, 4.0, 5.0], 0.0625),
    # Sum 13 of |d| total 15; flipping magnitudes S gives 15 - 2S, |15 - 2S| >= 13 for S <= 1 ({}, {1})
    # or S >= 14 (their complements): 4/32.
    ([-1.0, 2.0, 3.0, 4.0, 5.0], 0.125),
    # Sum 11: S <= 2 ({}, {1}, {2}) or S >= 13 (complements): 6/32.
    ([-2.0, 1.0, 3.0, 4.0, 5.0], 0.1875),
    # Symmetric: sum 0, every assignment is at least as extreme.
    ([-1.0, 1.0], 1.0),
    ([0.3], 1.0),
])
def test_sign_flip_p_exact_by_hand(diffs, p):
    assert sign_flip_p(diffs) == (pytest.approx(p), "exact")
    assert sign_flip_p([-d for d in diffs]) == (pytest.approx(p), "exact")  # two-sided


def test_sign_flip_p_counts_float_ties_as_extreme():
    # 0.1 + 0.2 - 0.3 style rounding must not drop the observed assignment: d = 0.1, 0.2, 0.3 is like 1, 2, 3.
    assert sign_flip_p([0.1, 0.2, 0.3])[0] == pytest.approx(0.25)


def test_sign_flip_p_goes_monte_carlo_beyond_the_exact_limit():
    # 20 equal positive pairs: exact p = 2 / 2^20 ~ 1.9e-6; 100000 draws almost surely hit none -> 1 / 100001.
    p, method = sign_flip_p([1.0] * 20)
    assert method == "monte carlo" and p == pytest.approx(1 / 100_001)
    # Forced to sample a case small enough to enumerate: close to the exact value, and repeatable (seeded).
    diffs = [1.0, -2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    exact, _ = sign_flip_p(diffs)
    sampled, method = sign_flip_p(diffs, exact_max=0)
    assert method == "monte carlo" and abs(sampled - exact) < 0.003  # ~6 standard errors of 100000 draws
    assert sign_flip_p(diffs, exact_max=0) == (sampled, method)


def test_t_interval_by_hand():
    # d = 0.10, 0.12, 0.14: mean 0.12, sd 0.02; t(0.975, 2) = 4.3027 -> half width 4.3027 * 0.02 / √3 = 0.049683
    mean, low, high = t_interval([0.10, 0.12, 0.14])
    assert mean == pytest.approx(0.12)
    assert (low, high) == (pytest.approx(0.12 - 0.049683, abs=1e-5), pytest.approx(0.12 + 0.049683, abs=1e-5))
    one = t_interval([0.2])
    assert one[0] == 0.2 and math.isnan(one[1]) and math.isnan(one[2])


def test_tost_by_hand():
    # d = 1, 2, 3: mean 2, sd 1, se 1/√3. Margin 5: t = (2 + 5)·√3 = 12.124 against -5 (upper tail),
    # t = (2 - 5)·√3 = -5.196 against +5 (lower tail); p = max(1 - F(12.124), F(-5.196)) = F(-5.196) = 0.017549.
    p = tost_p([1.0, 2.0, 3.0], 5.0)
    assert p == pytest.approx(t2_cdf(-3 * math.sqrt(3)), abs=1e-9) == pytest.approx(0.017549, abs=1e-6)
    # Margin 2.5: t = -0.5·√3 = -0.866 -> F = 0.2389: the mean is too close to the margin to claim equivalence.
    assert tost_p([1.0, 2.0, 3.0], 2.5) == pytest.approx(t2_cdf(-0.5 * math.sqrt(3)), abs=1e-9)
    # Centred at 0, it is the same either side: d = -1, 0, 1, margin 2 -> F(-2√3) = 0.0370.
    assert tost_p([-1.0, 0.0, 1.0], 2.0) == pytest.approx(t2_cdf(-2 * math.sqrt(3)), abs=1e-9)
    # No spread: inside the margin is certain, outside impossible; one pair says nothing.
    assert tost_p([1.0, 1.0], 2.0) == 0.0 and tost_p([3.0, 3.0], 2.0) == 1.0
    assert math.isnan(tost_p([1.0], 2.0))


def test_holm_on_a_known_family():
    # Sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06.
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # NaN is outside the family (m = 2): 0.01·2, 0.04·1.
    adjusted = holm([0.01, math.nan, 0.04])
    assert adjusted[0] == pytest.approx(0.02) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.04)
    assert holm([0.5, 0.6]) == [1.0, 1.0]  # capped at 1, never decreasing
    assert holm([0.2]) == [0.2] and holm([]) == []


@pytest.mark.parametrize(("mean", "p_holm", "p_tost_holm", "expected"), [
    (0.1, 0.01, 0.9, HELPS),
    (-0.1, 0.01, 0.9, HURTS),
    (0.01, 0.01, 0.001, HELPS),  # a small but sure gain is a gain, even inside the margin
    (0.01, 0.3, 0.01, EQUIVALENT),
    (0.01, 0.3, 0.05, INCONCLUSIVE),  # 0.05 is not below 0.05
    (0.01, 0.05, 0.2, INCONCLUSIVE),
    (0.2, 1.0, math.nan, INCONCLUSIVE),  # one pair: no equivalence test
])
def test_decide(mean, p_holm, p_tost_holm, expected):
    assert decide(mean, p_holm, p_tost_holm) == expected


def test_seeds_needed():
    # sd 10, margin 5: need t(0.975, n-1)/√n <= 0.5. n = 17: 2.120 / 4.123 = 0.514; n = 18: 2.110 / 4.243 = 0.497.
    assert seeds_for_halfwidth(10.0, 5.0) == 18
    # sd 0.02, margin 0.05 as in the interval above: n = 2 gives 12.706·0.02/√2 = 0.180, n = 3 gives 0.0497.
    assert seeds_for_halfwidth(0.02, 0.05) == 3
    assert seeds_for_halfwidth(0.0, 5.0) == 2 and seeds_for_halfwidth(math.nan, 5.0) is None
    # Effect size 0.5 at 80 % power, two-sided 0.05: 34 pairs (the usual table value for a paired t-test;
    # the normal approximation ((1.960 + 0.842) / 0.5)^2 = 31.4 is a little short of it).
    assert seeds_for_power(10.0, 5.0) == 34
    assert seeds_for_power(1.0, 1e-4) is None  # more than anyone would run
    assert seeds_for_power(math.nan, 5.0) is None


def test_compare_and_adjust_give_each_cell_its_verdict():
    gain = compare([0.10, 0.12, 0.14, 0.11, 0.13, 0.12, 0.10], 0.05)  # 7 positive pairs: exact p = 2/128
    flat = compare([0.01, -0.01, 0.0, 0.02, -0.02, 0.01, -0.01], 0.05)
    noisy = compare([0.3, -0.2], 0.05)
    assert (gain.n, gain.perm_method, gain.p_perm) == (7, "exact", pytest.approx(2 / 128))
    assert gain.verdict == "" and math.isnan(gain.p_holm)  # family-wide values wait for adjust
    tested = adjust([gain, flat, noisy])
    # Holm over 3: gain 0.015625·3 = 0.047 < 0.05 -> helps; flat's TOST p is tiny -> equivalent.
    assert tested[0].p_holm == pytest.approx(3 * 2 / 128) and tested[0].verdict == HELPS
    assert tested[1].verdict == EQUIVALENT and tested[1].p_tost_holm < 0.05
    assert tested[2].verdict == INCONCLUSIVE
    # The same gain in a family of 4 no longer survives: 4·2/128 = 0.0625.
    assert adjust([gain, flat, noisy, noisy])[0].verdict != HELPS
    with pytest.raises(ValueError):
        compare([], 0.05)


def test_too_few_seeds_are_named_before_a_grid_spends_them():
    # With n pairs all of one sign, 2 of the 2^n sign flips are as extreme: the test's floor.
    for n in (3, 5, 6):
        assert smallest_sign_flip_p(n) == sign_flip_p([1.0] * n)[0] == 2 / 2 ** n
    assert seeds_note(5) == ("5 paired seeds: the report's sign-flip test cannot go below p = 0.0625, so no row "
                                   "can read helps or hurts; list at least 6 seeds (more when Holm corrects over many rows)")
    assert seeds_note(1).startswith("1 paired seed: ") and seeds_note(6) is None
