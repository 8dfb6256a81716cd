"""Weighted mean of model weights, one site's reply at a time (FedAvg without holding the replies).

The coordinator adds each training reply to :class:`WeightedSum` as it arrives and can drop the
reply right after: memory is one accumulator per array, whatever the number of sites. The
accumulator is **float64**, so the mean of float32 weights equals FedAvg's
``sum_i (w_i / W) x_i`` (Flower's ``aggregate_arrayrecords``, which accumulates in float32) up
to float32 rounding of the result. Called by ``server.training`` (streaming aggregation);
never imports Flower.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

#: Elements added per step: the temporary ``weight * x`` stays this small (8 MiB in float64)
#: instead of one model-sized array per reply.
CHUNK_ELEMENTS = 1 << 20


class WeightedSum:
    """Running ``sum_i w_i * x_i`` and ``sum_i w_i`` over named arrays (float64 accumulator)."""

    def __init__(self) -> None:
        self._sums: dict[str, npt.NDArray[np.float64]] = {}
        self._dtypes: dict[str, np.dtype] = {}
        self.total_weight = 0.0
        self.count = 0

    @classmethod
    def like(cls, arrays: Mapping[str, npt.NDArray[np.floating]]) -> WeightedSum:
        """An empty sum that accepts only arrays of these names, shapes and dtypes (e.g. the
        global weights a round sent): a reply that differs is refused before it counts."""
        total = cls()
        for name, x in arrays.items():
            total._sums[name] = np.zeros(np.shape(x), dtype=np.float64)
            total._dtypes[name] = np.asarray(x).dtype
        return total

    def check(
        self, arrays: Mapping[str, npt.NDArray[np.floating]], weight: float
    ) -> tuple[dict[str, npt.NDArray[np.floating]], float]:
        """The arrays and weight :meth:`add` would take, or ValueError saying what does not fit:
        a weight that is not a finite number >= 0; other names or shapes than the sum's (once it
        has any); an array that is not floating point or holds NaN or infinity (one diverged
        site would make the whole mean NaN). Changes nothing."""
        weight = float(weight)
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"weight must be a finite number >= 0, got {weight!r}")
        xs = {name: np.asarray(x) for name, x in arrays.items()}
        if self._sums:
            if set(xs) != set(self._sums):
                raise ValueError(f"arrays {sorted(xs)} differ from the expected {sorted(self._sums)}")
            for name, x in xs.items():
                if x.shape != self._sums[name].shape:
                    raise ValueError(f"array {name!r} has shape {x.shape}, expected {self._sums[name].shape}")
        for name, x in xs.items():
            if not np.issubdtype(x.dtype, np.floating):
                raise ValueError(f"array {name!r} has dtype {x.dtype}, expected floating point")
            if not np.isfinite(x).all():
                raise ValueError(f"array {name!r} holds non-finite values (NaN or infinity)")
        return xs, weight

    def add(self, arrays: Mapping[str, npt.NDArray[np.floating]], weight: float) -> None:
        """Add one reply's arrays with ``weight`` (e.g. its training slices); the caller may
        free ``arrays`` afterwards. The first reply (or :meth:`like`) fixes the names and
        shapes; a reply that does not fit (:meth:`check`) raises ValueError and leaves the sum
        as it was."""
        xs, weight = self.check(arrays, weight)
        if not self._sums:
            self._sums = {n: np.zeros(x.shape, dtype=np.float64) for n, x in xs.items()}
            self._dtypes = {n: x.dtype for n, x in xs.items()}
        for name, x in xs.items():
            _add_scaled(self._sums[name].reshape(-1), x.reshape(-1), weight)
        self.total_weight += weight
        self.count += 1

    def mean(self) -> dict[str, npt.NDArray[np.floating]]:
        """``sum_i w_i x_i / sum_i w_i`` per array, in the dtype the replies had."""
        if not self.count:
            raise ValueError("no reply was added: nothing to average")
        if self.total_weight <= 0:
            raise ValueError(f"the replies' weights sum to {self.total_weight}: nothing to average by")
        return {n: (s / self.total_weight).astype(self._dtypes[n]) for n, s in self._sums.items()}


def _add_scaled(acc: npt.NDArray[np.float64], x: npt.NDArray[np.floating], weight: float) -> None:
    """``acc += weight * x`` in float64, a chunk at a time (no model-sized temporary)."""
    for start in range(0, acc.size, CHUNK_ELEMENTS):
        part = slice(start, start + CHUNK_ELEMENTS)
        acc[part] += weight * x[part].astype(np.float64)


def weighted_mean(
    replies: list[tuple[Mapping[str, npt.NDArray[np.floating]], float]],
) -> dict[str, npt.NDArray[np.floating]]:
    """The same mean from replies already in memory (the streaming sum fed in order)."""
    total = WeightedSum()
    for arrays, weight in replies:
        total.add(arrays, weight)
    return total.mean()


__all__ = ["CHUNK_ELEMENTS", "WeightedSum", "weighted_mean"]
