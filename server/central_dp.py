"""Central DP on training replies (server-side fixed clipping), one reply at a time.

What Flower's ``DifferentialPrivacyServerSideFixedClipping`` does, with Flower's own
primitives (``flwr.supercore.differential_privacy``: ``compute_clip_model_update``,
``compute_stdv``, ``add_gaussian_noise_inplace``), but streamed like the plain FedAvg path
(:class:`common.weighted_sum.WeightedSum`): each site's update (its weights minus the round's
global weights) is clipped to ``clipping_norm`` in L2 over all arrays and added to a running
sum as its reply arrives, so the coordinator never holds more than one site's weights. Then
the mean, plus Gaussian noise of standard deviation ``noise_multiplier x clipping_norm / n``.

Two choices differ from Flower's wrapper (used without its accountant), both so that the
noise covers what one site can change:

- **Each site weighs 1/n**, whatever its ``num-examples``. Under FedAvg's weights a site
  with a share ``w_i / W`` above ``1/n`` moves the mean by up to ``clipping_norm x w_i / W``,
  more than the ``clipping_norm / n`` the noise is sized for (Flower's accountant refuses
  unequal weights for this reason; without it, the wrapper lets them through).
- **n is the number of replies averaged**, not the number of sites asked: when a site does
  not reply, the mean of the others moves by ``clipping_norm / n_replied`` per site, and
  the noise follows it (the wrapper divides by the sites asked and only logs a warning).

With every site replying and equal weights, the result is the wrapper's, draw for draw
(``tests/test_scale_aggregation.py``).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt
from flwr.supercore.differential_privacy import (
    add_gaussian_noise_inplace,
    compute_clip_model_update,
    compute_stdv,
    get_norm,
)

from common.dp_accounting import protection_summary
from common.weighted_sum import WeightedSum

Arrays = Mapping[str, npt.NDArray[np.floating]]


class ClippedMean:
    """Running sum of clipped updates around ``global_arrays``; :meth:`noised_mean` at the end."""

    def __init__(self, global_arrays: Arrays, clipping_norm: float) -> None:
        if not clipping_norm > 0:
            raise ValueError(f"clipping_norm must be > 0, got {clipping_norm!r}")
        self.clipping_norm = float(clipping_norm)
        self._names = list(global_arrays)
        self._global = [np.asarray(global_arrays[name]) for name in self._names]
        self._sum = WeightedSum.like(global_arrays)

    @property
    def count(self) -> int:
        """Replies added so far."""
        return self._sum.count

    def add(self, arrays: Arrays, weight: float) -> None:
        """Add one site's weights, clipped around the global weights. ``weight`` (its
        ``num-examples``) is checked like FedAvg's but not used: every site weighs the same.
        A reply whose arrays differ from the global ones raises ValueError and is not added."""
        # FedAvg's checks first: names, shapes, weight, and no NaN (a NaN norm would leave the
        # update unclipped: min(1, clip / NaN) is 1)
        xs, _ = self._sum.check(arrays, weight)
        clipped = [np.array(xs[name], copy=True) for name in self._names]
        update = [x - g for x, g in zip(clipped, self._global, strict=True)]
        if get_norm(update) > 0:  # Flower's clip divides by the norm; no update has nothing to clip
            compute_clip_model_update(clipped, self._global, self.clipping_norm)
        self._sum.add(dict(zip(self._names, clipped, strict=True)), 1.0)

    def noised_mean(self, noise_multiplier: float) -> tuple[dict[str, npt.NDArray[np.floating]], float]:
        """The mean of the clipped weights plus Gaussian noise (numpy's global generator, as
        Flower's), and the noise's standard deviation. ValueError when nothing was added."""
        mean = self._sum.mean()
        arrays = [mean[name] for name in self._names]
        stdv = compute_stdv(noise_multiplier, self.clipping_norm, self._sum.count)
        add_gaussian_noise_inplace(arrays, stdv)
        return dict(zip(self._names, arrays, strict=True)), stdv


def central_dp_note(noise_multiplier: float, clipping_norm: float, rounds: int) -> str:
    """The report's note on a study trained with central DP over ``rounds`` aggregated rounds:
    the settings, and what they protect (``common.dp_accounting``: epsilon, and the best
    accuracy of an observer of the published models telling whether a patient was in a site's
    data, with a plain warning when that is weak or when no noise was added)."""
    return (
        f"central DP (server-side fixed clipping): noise multiplier {noise_multiplier}, clipping norm "
        f"{clipping_norm}; every site's update weighs the same, and each round's noise is sized by "
        f"the updates it averaged; {protection_summary(noise_multiplier, rounds)}"
    )


__all__ = ["ClippedMean", "central_dp_note"]
