"""What a clipped, Gaussian-noised update gives away, in numbers a privacy officer can read.

Central DP (``server.central_dp``) and a site's ``weights-dp`` policy release an update clipped
to L2 norm ``C`` plus Gaussian noise of standard deviation ``z x C`` (``z`` the noise
multiplier; at the coordinator the mean's noise is ``z x C / n``, which an observer who knows
the other ``n - 1`` updates scales back to ``z x C``). Two versions of one site's data (one
patient in or out, or one patient's labels changed) can move the clipped update anywhere in
the ball of radius ``C``: by up to ``2 C``. That is the Gaussian mechanism with sensitivity
``2 C`` and noise ``z C``: ``mu``-Gaussian differential privacy with ``mu = 2 / z`` per release
(Dong, Roth and Su, "Gaussian Differential Privacy", JRSS-B 2022), and ``R`` releases of the
same site compose to ``mu = 2 sqrt(R) / z``.

``mu`` answers the question an attacker asks: no test that looks at everything released, and
knows everything else, tells the two versions apart more often than
``Phi(mu / 2)`` of the time with even odds (:func:`attack_accuracy_bound`; 0.5 is guessing).
The usual ``(epsilon, delta)`` pair follows exactly from ``mu`` (:func:`epsilon_of`).
``tests/test_central_dp_attack.py`` runs that attacker against real site updates.
"""

from __future__ import annotations

import math
from typing import Final

from scipy.optimize import brentq
from scipy.stats import norm

#: the delta the report states its epsilon at: well below one over any study's patient count
DELTA: Final = 1e-5
#: above this accuracy bound an update is called weakly protected, in the report and ``site check``
WEAK_ACCURACY: Final = 0.75


def gaussian_mu(noise_multiplier: float, releases: int) -> float:
    """``mu`` of ``releases`` updates clipped to ``C`` with noise ``noise_multiplier x C`` each
    (``inf`` without noise: the update itself is out)."""
    if noise_multiplier < 0 or releases < 0:
        raise ValueError(f"noise_multiplier and releases must be >= 0, got {noise_multiplier}, {releases}")
    if releases == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    return 2.0 * math.sqrt(releases) / noise_multiplier


def attack_accuracy_bound(mu: float) -> float:
    """The best accuracy any attacker reaches telling two neighbouring versions of a site's
    data apart from ``mu``-GDP releases, with even odds: ``Phi(mu / 2)``."""
    return 1.0 if math.isinf(mu) else float(norm.cdf(mu / 2.0))


def delta_of(mu: float, epsilon: float) -> float:
    """The delta a ``mu``-GDP mechanism has at ``epsilon`` (Dong, Roth and Su, Corollary 2.13)."""
    # e^epsilon x Phi(.) in logs: both overflow / underflow on their own for large mu
    return float(norm.cdf(-epsilon / mu + mu / 2) - math.exp(epsilon + norm.logcdf(-epsilon / mu - mu / 2)))


def epsilon_of(mu: float, delta: float = DELTA) -> float:
    """The smallest epsilon with ``delta_of(mu, epsilon) <= delta`` (``inf`` without noise)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if math.isinf(mu):
        return math.inf
    if mu == 0 or delta_of(mu, 0.0) <= delta:
        return 0.0
    high = 1.0
    while delta_of(mu, high) > delta:
        high *= 2
    return float(brentq(lambda e: delta_of(mu, e) - delta, 0.0, high, xtol=1e-9))


def protection_summary(noise_multiplier: float, releases: int, delta: float = DELTA) -> str:
    """One sentence for the report and ``site check``: epsilon, and the attacker's bound."""
    mu = gaussian_mu(noise_multiplier, releases)
    if math.isinf(mu):
        return (
            f"{releases} release(s) without noise: each clipped update is published as it is, "
            "so this gives no differential-privacy guarantee"
        )
    bound, epsilon = attack_accuracy_bound(mu), epsilon_of(mu, delta)
    text = (
        f"over {releases} release(s) at noise multiplier {noise_multiplier}: epsilon {epsilon:.3g} "
        f"at delta {delta:g} (mu-GDP, mu {mu:.3g}); an observer who knows everything else can tell "
        f"whether one patient was in a site's data at most {bound:.1%} of the time (50% is guessing)"
    )
    if bound > WEAK_ACCURACY:
        text += (
            "; that is weak protection: raise the noise multiplier (the bound falls as 1 / multiplier), "
            "or protect patients at the sites with DP-SGD ([dp-sgd] in policy.toml)"
        )
    return text


__all__ = [
    "DELTA",
    "WEAK_ACCURACY",
    "attack_accuracy_bound",
    "delta_of",
    "epsilon_of",
    "gaussian_mu",
    "protection_summary",
]
