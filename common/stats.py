"""Small-sample statistics for aggregates: binomial and mean intervals, one-sided tests.

Everything here works from sufficient statistics (counts, sums, sums of squares), so the
same functions serve a site summarising its own slices and a coordinator comparing sites.
Intervals are two-sided 95% unless ``level`` says otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy import stats as _stats

LEVEL = 0.95


def _z(level: float) -> float:
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must be in (0, 1), got {level}")
    return float(_stats.norm.ppf(0.5 + level / 2.0))


def wilson_interval(k: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Wilson score interval of a proportion ``k / n`` (``(0, 1)`` when ``n == 0``).

    Wilson rather than the Wald interval: it stays inside [0, 1] and keeps its coverage at
    the small n (5 to 30 slices) a site has, including k = 0 and k = n.
    """
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    z = _z(level)
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return low, high


@dataclass(frozen=True)
class MeanInterval:
    """Mean of ``n`` values with its t interval (``low``/``high`` None below two values)."""

    n: int
    mean: float | None
    sd: float | None
    low: float | None
    high: float | None


def mean_interval(n: int, total: float, total_sq: float, level: float = LEVEL) -> MeanInterval:
    """Mean, sd and t interval of ``n`` values from their sum and sum of squares."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n == 0:
        return MeanInterval(0, None, None, None, None)
    mean = total / n
    if n < 2:
        return MeanInterval(n, mean, None, None, None)
    var = max(total_sq - total * total / n, 0.0) / (n - 1)
    sd = math.sqrt(var)
    half = float(_stats.t.ppf(0.5 + level / 2.0, n - 1)) * sd / math.sqrt(n)
    return MeanInterval(n, mean, sd, mean - half, mean + half)


def _fisher_p(k1: int, n1: int, k2: int, n2: int, alternative: str) -> float:
    """p-value of Fisher's exact test on ``k1/n1`` vs ``k2/n2`` (1 when either n is 0)."""
    for k, n in ((k1, n1), (k2, n2)):
        if n < 0 or not 0 <= k <= n:
            raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n1 == 0 or n2 == 0:
        return 1.0
    table = [[k1, n1 - k1], [k2, n2 - k2]]
    return float(_stats.fisher_exact(table, alternative=alternative).pvalue)


def proportion_greater_p(k1: int, n1: int, k2: int, n2: int) -> float:
    """One-sided p-value of Fisher's exact test that proportion 1 exceeds proportion 2."""
    return _fisher_p(k1, n1, k2, n2, "greater")


def proportions_differ_p(k1: int, n1: int, k2: int, n2: int) -> float:
    """Two-sided p-value of Fisher's exact test that proportions ``k1/n1`` and ``k2/n2`` differ."""
    return _fisher_p(k1, n1, k2, n2, "two-sided")


#: Bland-Altman limits of agreement are mean +- this many sd.
LIMITS_Z = 1.96


@dataclass(frozen=True)
class AgreementLimits:
    """Bland-Altman limits of agreement of ``n`` differences, each with its approximate interval.

    ``low``/``high`` = mean -+ 1.96 sd; the mean's interval is the t interval; a limit's is
    limit -+ t(n-1) x sqrt(3 sd^2 / n) (Bland & Altman 1986, 1999: the standard error of a
    limit is about sqrt(3 s^2 / n)).
    """

    n: int
    mean: float
    sd: float
    low: float
    high: float
    mean_ci: tuple[float, float]
    low_ci: tuple[float, float]
    high_ci: tuple[float, float]


def agreement_limits(
    n: int, mean: float | None, sd: float | None, level: float = LEVEL
) -> AgreementLimits | None:
    """Limits of agreement with their intervals from n, mean and sd of the differences (None below
    two differences or without an sd)."""
    if mean is None or sd is None or n < 2:
        return None
    t = float(_stats.t.ppf(0.5 + level / 2.0, n - 1))
    half_mean = t * sd / math.sqrt(n)
    half_limit = t * math.sqrt(3.0 * sd * sd / n)
    low, high = mean - LIMITS_Z * sd, mean + LIMITS_Z * sd
    return AgreementLimits(
        n=n,
        mean=mean,
        sd=sd,
        low=low,
        high=high,
        mean_ci=(mean - half_mean, mean + half_mean),
        low_ci=(low - half_limit, low + half_limit),
        high_ci=(high - half_limit, high + half_limit),
    )


__all__ = [
    "LEVEL",
    "LIMITS_Z",
    "AgreementLimits",
    "MeanInterval",
    "agreement_limits",
    "mean_interval",
    "proportion_greater_p",
    "proportions_differ_p",
    "wilson_interval",
]
