"""Small-sample statistics from sufficient statistics, checked by hand and against numpy/scipy."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from common.stats import (
    agreement_limits,
    mean_interval,
    proportion_greater_p,
    proportions_differ_p,
    wilson_interval,
)


def test_wilson_interval_known_values() -> None:
    low, high = wilson_interval(5, 5)
    assert low == pytest.approx(0.5655, abs=1e-4) and high == 1.0
    assert wilson_interval(0, 12) == (0.0, pytest.approx(0.2425, abs=1e-4))
    assert wilson_interval(0, 0) == (0.0, 1.0)
    low, high = wilson_interval(4, 5)
    assert low < 0.5 < high  # 4 of 5 slices is not enough to call it consistent


def test_wilson_interval_refuses_impossible_counts() -> None:
    with pytest.raises(ValueError, match="0 <= k <= n"):
        wilson_interval(6, 5)


def test_mean_interval_matches_numpy_and_scipy() -> None:
    values = np.array([1.0, 2.5, 3.0, 7.5])
    got = mean_interval(len(values), float(values.sum()), float((values**2).sum()))
    assert got.mean == pytest.approx(values.mean()) and got.sd == pytest.approx(values.std(ddof=1))
    low, high = stats.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=stats.sem(values))
    assert (got.low, got.high) == (pytest.approx(low), pytest.approx(high))
    assert mean_interval(1, 2.0, 4.0).low is None and mean_interval(0, 0, 0).mean is None


def test_one_sided_fisher() -> None:
    assert proportion_greater_p(10, 12, 2, 24) < 1e-3
    assert proportion_greater_p(2, 12, 10, 24) > 0.9


def test_two_sided_fisher() -> None:
    assert proportions_differ_p(15, 18, 3, 14) == pytest.approx(stats.fisher_exact([[15, 3], [3, 11]]).pvalue)
    assert proportions_differ_p(3, 14, 15, 18) == pytest.approx(proportions_differ_p(15, 18, 3, 14))
    assert proportions_differ_p(5, 10, 0, 0) == 1.0


def test_bland_altman_limits_and_their_intervals_by_hand() -> None:
    """n = 4, mean 1, sd 2: limits 1 -+ 3.92; SE of a limit sqrt(3 x 4 / 4) = sqrt(3); t(3) = 3.182."""
    got = agreement_limits(4, 1.0, 2.0)
    assert got is not None
    assert (got.low, got.high) == (pytest.approx(-2.92), pytest.approx(4.92))
    half = 3.1824463 * 3**0.5
    assert got.low_ci == (pytest.approx(-2.92 - half), pytest.approx(-2.92 + half))
    assert got.high_ci == (pytest.approx(4.92 - half), pytest.approx(4.92 + half))
    assert got.mean_ci == (pytest.approx(1 - 3.1824463), pytest.approx(1 + 3.1824463))  # sd / sqrt(4) = 1
    assert agreement_limits(1, 1.0, None) is None and agreement_limits(1, 1.0, 2.0) is None
