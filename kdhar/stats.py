"""Paired KD-vs-scratch statistics: the tests behind a report's verdicts, as pure functions of numbers.

Every function takes the per-seed differences d_s = KD_s - scratch_s of one cell (already paired; which
runs pair is the caller's business) in whatever unit the caller uses (the report uses fractions of 1).

- `t_interval`: mean(d) ± t(1 - α/2, n - 1)·sd(d)/√n.
- `sign_flip_p`: two-sided paired permutation test. Under "KD makes no difference" each d_s is as likely
  to be +|d_s| as -|d_s|; the p-value is the share of sign assignments whose |Σ d| is at least the
  observed one. Exact (all 2^n assignments) up to `EXACT_MAX_PAIRS` pairs, else a seeded Monte-Carlo.
- `tost_p`: equivalence, two one-sided paired t-tests of mean(d) ≤ -margin and mean(d) ≥ +margin.
- `holm`: Holm's step-down adjustment of a family of p-values (scipy has only Benjamini-Hochberg).
- `decide`: helps / hurts / equivalent / inconclusive from the adjusted p-values.
- `seeds_for_halfwidth`, `seeds_for_power`: how many pairs the observed spread calls for.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from scipy import stats

ALPHA = 0.05
EXACT_MAX_PAIRS = 16  # 2^16 = 65536 sign assignments: exact enumeration stays instant
MC_DRAWS = 100_000
MC_SEED = 0
MAX_SEEDS = 100_000  # seeds_for_* give up (None) beyond this

HELPS, HURTS, EQUIVALENT, INCONCLUSIVE = "helps", "hurts", "equivalent", "inconclusive"


@dataclass(frozen=True)
class PairedTest:
    """One cell's paired comparison over n pairs; NaN where a quantity needs more pairs than there are.

    `p_holm`, `p_tost_holm` and `verdict` are filled in by `adjust` once the whole family is known.
    """

    n: int
    mean: float
    sd: float
    low: float  # t-interval at 1 - ALPHA
    high: float
    p_perm: float  # two-sided sign-flip p-value
    perm_method: str  # "exact" or "monte carlo"
    p_tost: float  # equivalence within ±margin
    margin: float
    seeds_for_margin: int | None  # pairs for a half-width ≤ margin at this sd
    seeds_for_power: int | None  # pairs for 80 % power to detect a difference of `margin` at this sd
    p_holm: float = math.nan
    p_tost_holm: float = math.nan
    verdict: str = ""


def _t(confidence: float, df: int) -> float:
    return float(stats.t.ppf(1 - (1 - confidence) / 2, df))


def t_interval(diffs: Sequence[float], confidence: float = 1 - ALPHA) -> tuple[float, float, float]:
    """Mean of the differences and its two-sided Student-t interval; bounds NaN for fewer than 2 pairs."""
    d = np.asarray(diffs, dtype=float)
    mean = float(d.mean())
    if d.size < 2:
        return mean, math.nan, math.nan
    half = _t(confidence, d.size - 1) * float(d.std(ddof=1)) / math.sqrt(d.size)
    return mean, mean - half, mean + half


def sign_flip_p(diffs: Sequence[float], exact_max: int = EXACT_MAX_PAIRS, draws: int = MC_DRAWS,
                seed: int = MC_SEED) -> tuple[float, str]:
    """Two-sided paired sign-flip (permutation) p-value of mean(d) = 0, and how it was computed.

    Exact for n ≤ `exact_max`: the share of all 2^n sign assignments (the observed one included) with
    |Σ ±d_s| ≥ |Σ d_s|. Beyond that, `draws` random assignments from a generator seeded with `seed`,
    p = (1 + hits) / (1 + draws), which never reports 0 for a finite sample.

    Returns:
        (p, "exact") or (p, "monte carlo").
    """
    d = np.abs(np.asarray(diffs, dtype=float))
    observed = abs(float(np.sum(diffs)))
    # Sums equal to the observed one must count as "as extreme" despite float rounding.
    tol = 1e-9 * max(float(d.sum()), 1e-300)
    if d.size <= exact_max:
        bits = (np.arange(2 ** d.size)[:, None] >> np.arange(d.size)) & 1
        sums = np.abs((1 - 2 * bits) @ d)
        return float(np.mean(sums >= observed - tol)), "exact"
    rng = np.random.default_rng(seed)
    hits, left = 0, draws
    while left:  # in chunks, so that many pairs times many draws stays small in memory
        k = min(left, 10_000)
        signs = rng.choice((-1.0, 1.0), size=(k, d.size))
        hits += int(np.sum(np.abs(signs @ d) >= observed - tol))
        left -= k
    return (1 + hits) / (1 + draws), "monte carlo"


def smallest_sign_flip_p(pairs: int) -> float:
    """The smallest two-sided p the exact sign-flip test can give with `pairs` pairs (every
    difference of one sign): 2 of the 2^n sign assignments are as extreme as the observed one."""
    return min(1.0, 2.0 / 2 ** pairs)


def seeds_note(pairs: int, alpha: float = ALPHA) -> str | None:
    """A warning when `pairs` paired seeds are too few for any verdict but "inconclusive" or
    "equivalent"; None when the sign-flip test can reach `alpha` (before any correction)."""
    p = smallest_sign_flip_p(pairs)
    if p < alpha:
        return None
    least = next(n for n in range(1, 64) if smallest_sign_flip_p(n) < alpha)
    return (f"{pairs} paired seed{'s' if pairs != 1 else ''}: the report's sign-flip test cannot go below p = {p:.3g}, "
            f"so no row can read helps or hurts; list at least {least} seeds (more when Holm corrects over many rows)")


def tost_p(diffs: Sequence[float], margin: float) -> float:
    """Equivalence p-value: the larger of the two one-sided paired t-tests against -margin and +margin.

    Small means the mean difference lies within ±margin. NaN for fewer than 2 pairs; with no spread at
    all it is 0 when |mean| < margin and 1 otherwise.
    """
    d = np.asarray(diffs, dtype=float)
    if d.size < 2:
        return math.nan
    mean, se = float(d.mean()), float(d.std(ddof=1)) / math.sqrt(d.size)
    if se == 0:
        return 0.0 if abs(mean) < margin else 1.0
    df = d.size - 1
    p_low = float(stats.t.sf((mean + margin) / se, df))  # H0: mean ≤ -margin
    p_high = float(stats.t.cdf((mean - margin) / se, df))  # H0: mean ≥ +margin
    return max(p_low, p_high)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order; NaN entries are not in the family.

    With m p-values sorted ascending, the k-th smallest (k = 1..m) becomes (m - k + 1)·p_(k), made
    non-decreasing and capped at 1. Rejecting where the adjusted p < α keeps the chance of any false
    rejection in the family at most α.
    """
    idx = [i for i, p in enumerate(pvalues) if not math.isnan(p)]
    order = sorted(idx, key=lambda i: pvalues[i])
    out = [math.nan] * len(pvalues)
    running = 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - k) * pvalues[i]))
        out[i] = running
    return out


def decide(mean: float, p_holm: float, p_tost_holm: float, alpha: float = ALPHA) -> str:
    """helps / hurts when the adjusted difference test rejects (by the sign of the mean), equivalent
    when the adjusted equivalence test rejects instead, else inconclusive."""
    if p_holm < alpha:
        return HELPS if mean > 0 else HURTS
    if p_tost_holm < alpha:
        return EQUIVALENT
    return INCONCLUSIVE


def _fewest(ok) -> int | None:
    """Smallest n in [2, MAX_SEEDS] with ok(n), for an ok that stays true once true (bisection)."""
    if not ok(MAX_SEEDS):
        return None
    lo, hi = 2, MAX_SEEDS
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid + 1, hi)
    return lo


def seeds_for_halfwidth(sd: float, margin: float, confidence: float = 1 - ALPHA) -> int | None:
    """Fewest pairs n ≥ 2 with t(1 - α/2, n - 1)·sd/√n ≤ margin; None when sd is unknown or n > MAX_SEEDS."""
    if math.isnan(sd) or margin <= 0:
        return None
    return _fewest(lambda n: _t(confidence, n - 1) * sd / math.sqrt(n) <= margin)


def seeds_for_power(sd: float, margin: float, power: float = 0.8, alpha: float = ALPHA) -> int | None:
    """Fewest pairs for a two-sided paired t-test at `alpha` to detect a true difference of `margin`
    with probability `power` (noncentral t), at the given sd of the differences."""
    if math.isnan(sd) or margin <= 0:
        return None
    if sd == 0:
        return 2

    def enough(n: int) -> bool:
        df, nc, crit = n - 1, margin / (sd / math.sqrt(n)), _t(1 - alpha, n - 1)
        wrong_side = float(stats.nct.cdf(-crit, df, nc))  # negligible, and NaN far out in scipy's tail
        return float(stats.nct.sf(crit, df, nc)) + (0.0 if math.isnan(wrong_side) else wrong_side) >= power

    return _fewest(enough)


def compare(diffs: Sequence[float], margin: float) -> PairedTest:
    """Every per-cell quantity of `PairedTest` for one cell's paired differences (at least one).

    The family-wide ones (`p_holm`, `p_tost_holm`, `verdict`) are left for `adjust`.
    """
    if not diffs:
        raise ValueError("compare needs at least one paired difference")
    d = np.asarray(diffs, dtype=float)
    mean, low, high = t_interval(d)
    sd = float(d.std(ddof=1)) if d.size > 1 else math.nan
    p, method = sign_flip_p(d)
    return PairedTest(n=int(d.size), mean=mean, sd=sd, low=low, high=high, p_perm=p, perm_method=method,
                      p_tost=tost_p(d, margin), margin=margin, seeds_for_margin=seeds_for_halfwidth(sd, margin),
                      seeds_for_power=seeds_for_power(sd, margin))


def adjust(family: Sequence[PairedTest], alpha: float = ALPHA) -> list[PairedTest]:
    """The family's tests with Holm-adjusted p-values (difference and equivalence, each over the whole
    family) and a verdict each, in the input order."""
    p_holm = holm([t.p_perm for t in family])
    p_tost_holm = holm([t.p_tost for t in family])
    return [replace(t, p_holm=ph, p_tost_holm=pt, verdict=decide(t.mean, ph, pt, alpha))
            for t, ph, pt in zip(family, p_holm, p_tost_holm)]
