"""The numbers the report gives a privacy officer for clipped, noised updates (common.dp_accounting).

The attacker's side of the same numbers: tests/test_central_dp_attack.py."""

from __future__ import annotations

import math

import pytest
from opacus.accountants import RDPAccountant

from common.dp_accounting import (
    DELTA,
    attack_accuracy_bound,
    delta_of,
    epsilon_of,
    gaussian_mu,
    protection_summary,
)


def test_mu_is_sensitivity_two_clips_over_the_noise_and_composes_as_the_square_root() -> None:
    assert gaussian_mu(4.0, 1) == pytest.approx(0.5)
    assert gaussian_mu(4.0, 9) == pytest.approx(1.5)
    assert gaussian_mu(0.0, 3) == math.inf and gaussian_mu(1.0, 0) == 0.0
    with pytest.raises(ValueError, match="noise_multiplier"):
        gaussian_mu(-1.0, 1)


@pytest.mark.parametrize("noise_multiplier", [1.0, 2.0, 4.0, 8.0])
def test_epsilon_is_exact_for_gdp_and_below_the_rdp_bound(noise_multiplier: float) -> None:
    """Checked against an independent accountant: Opacus's RDP accountant for the same Gaussian
    mechanism (its multiplier is noise over sensitivity, z C / 2 C) is an upper bound on the exact
    epsilon, and not a loose one in this range."""
    mu = gaussian_mu(noise_multiplier, 1)
    epsilon = epsilon_of(mu)
    assert delta_of(mu, epsilon) == pytest.approx(DELTA, rel=1e-6)
    rdp = RDPAccountant()
    rdp.history = [(noise_multiplier / 2, 1.0, 1)]
    assert epsilon <= rdp.get_epsilon(DELTA) <= 1.3 * epsilon


def test_the_attack_bound_is_half_at_no_signal_and_certainty_without_noise() -> None:
    assert attack_accuracy_bound(0.0) == 0.5
    assert attack_accuracy_bound(math.inf) == 1.0
    assert attack_accuracy_bound(2.0) == pytest.approx(0.8413, abs=1e-4)  # Phi(1)
    assert epsilon_of(math.inf) == math.inf and epsilon_of(0.0) == 0.0


def test_the_summary_warns_at_the_study_defaults_and_not_when_the_noise_is_enough() -> None:
    weak = protection_summary(0.1, 10)  # dp.noise-multiplier's default, ten rounds
    assert "weak protection" in weak and "epsilon 2.27e+03" in weak
    strong = protection_summary(8.0, 1)
    assert "weak" not in strong and "at most 55.0%" in strong
    assert "no differential-privacy guarantee" in protection_summary(0.0, 4)
