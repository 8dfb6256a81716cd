"""What a label-definition difference does to the diagnosis, computed at the site.

For each kind of muscle disagreement (class, direction, region), undo it on every slice
with a known height: add back the muscle the site left out (``site_excludes``) or take
away what it added (``site_includes``), and see how the SMI and the sarcopenia call move.
Only sums and counts leave: the mean SMI shift (with its 95% t interval, over every slice
with a known height: slices without the difference shift by 0) and how many calls would
change.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from common.cutoffs import is_sarcopenic
from common.discrepancy.slice import Key, SliceDiscrepancy
from common.stats import mean_interval
from protocols.findings import Finding


@dataclass
class _Sums:
    n: int = 0
    shift_sum: float = 0.0
    shift_sq_sum: float = 0.0
    changed: int = 0


class ImpactAccumulator:
    """Sufficient statistics of the SMI/diagnosis impact of each muscle disagreement."""

    def __init__(self, cutoff_set: str = "prado2008") -> None:
        self.cutoff_set = cutoff_set
        self._sums: dict[Key, _Sums] = defaultdict(_Sums)
        self.n_known = 0

    def add(
        self, result: SliceDiscrepancy, *, site_muscle_cm2: float, height_m: float | None, sex: str | None
    ) -> None:
        """One slice: the site's own muscle area, and the patient's height and sex."""
        if height_m is None or height_m <= 0:
            return
        self.n_known += 1
        h2 = height_m * height_m
        call = is_sarcopenic(site_muscle_cm2 / h2, sex, self.cutoff_set)
        for key, stat in result.stats.items():
            if key.tissue != "muscle":
                continue
            delta = stat.area_cm2 if key.direction == "site_excludes" else -stat.area_cm2
            sums = self._sums[key]
            sums.n += 1
            sums.shift_sum += delta / h2
            sums.shift_sq_sum += (delta / h2) ** 2
            other = is_sarcopenic((site_muscle_cm2 + delta) / h2, sex, self.cutoff_set)
            if call is not None and other is not None and other != call:
                sums.changed += 1

    def annotate(self, finding: Finding) -> Finding:
        """The finding with its SMI shift and changed calls (muscle findings only)."""
        if finding.tissue != "muscle" or not self.n_known:
            return finding
        sums = self._sums.get(Key(finding.tissue, finding.direction, finding.region), _Sums())
        # over every slice with a height: slices without this difference shift by 0
        shift = mean_interval(self.n_known, sums.shift_sum, sums.shift_sq_sum)
        return finding.model_copy(
            update={
                "smi_shift_mean": shift.mean,
                "smi_shift_low": shift.low,
                "smi_shift_high": shift.high,
                "calls_changed": sums.changed,
                "calls_known": self.n_known,
            }
        )
