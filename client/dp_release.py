"""Differentially private release of a site's aggregates, when the site's policy asks for it.

With ``[aggregate-dp] enabled = true`` in policy.toml, an evaluation or comparison reply
leaves as an epsilon-differentially private release (pure DP, delta = 0) with respect to
adding or removing one patient: the Laplace mechanism of OpenDP on counts and on clipped
sums, the reply's epsilon split equally over the statistics of :data:`STATISTICS` (basic
composition; a statistic that is not declared there, or spent twice, raises instead of
overspending). A patient contributes at most ``max-slices-per-patient`` slices (extra slices
are left out of the release, so the sensitivity is bounded whatever the data). Called by
``client.guard.policy_release`` with the payload the policy's other rules already applied.

Released, noised (each with its expected error, the Laplace sd, in ``dp.noised``):

- ``n_used``; per class the IoU-bin histogram with the undefined count (one histogram: each
  slice is in one cell); per class the mean IoU (noisy sum of per-slice IoU clipped to
  [0, 1] over the noisy defined count);
- muscle area difference (test - label) and SMI difference: sums of values clipped to
  ``+-AREA_CLIP_CM2`` / ``+-SMI_CLIP``, and their means, clamped to the same bounds;
- the sarcopenia confusion counts (when the exact reply has them).

Exact: ``n_listed`` (manifest rows: it says that rows were added, not any patient's value),
the site, fingerprint, model hash, role, split and protocol.

Withheld (marked in ``suppressed``: a per-slice sensitivity makes them useless or unsafe to
noise, or they would give the exact slice count back): the patient count, the exclusion
counts and an internal site's ``n_in_split`` (``n_listed - sum(excluded)`` is ``n_used``),
Dice, standard deviations (and so limits of agreement), medians and quartiles, pixel counts,
area and HU means, other tissues' areas, SMI means, harmonised and raw scores, the
discrepancy analysis, findings and the label audit.

What post-processing does to the numbers (:data:`MECHANISM` says it in every reply): noised
counts are rounded and clamped at 0 (the schema holds no negative count), so a cell whose
true count is 0 comes back as about ``b / 2`` on average (``b`` the Laplace scale,
``sd / sqrt(2)``): pooled over sites, rare bins and the undefined counts are biased upwards
by that much per site and cell. Noised sums are not clamped and pool without bias; the means
(noisy sum over noisy count, clamped to the bound) are biased towards the middle at small n.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from common.evaluation import SliceRecord, sarcopenia_confusion
from common.metrics import bin_name
from protocols.classes import IOU_BINS, METRIC_CLASSES
from protocols.payloads import DpRelease

#: Per-slice clipping bounds of the noised sums (and of the means released with them).
AREA_CLIP_CM2: Final = 50.0
SMI_CLIP: Final = 15.0
#: Every statistic one DP release composes; the reply's epsilon is split equally over them.
STATISTICS: Final[tuple[str, ...]] = (
    "n_used",
    *(f"scores.{c}.histogram" for c in METRIC_CLASSES),
    *(f"scores.{c}.iou_sum" for c in METRIC_CLASSES),
    "areas.muscle.sum_diff_cm2",
    "smi.n",
    "smi.sum_diff",
    "sarcopenia",
)
#: How a release was made, in the reply (the study report and ``site evaluate`` print it).
MECHANISM: Final = (
    "Laplace (OpenDP), basic composition over the released statistics; counts rounded and "
    "clamped at 0, which biases a count whose true value is 0 upwards by about sd/2.8 per site "
    "(pooled rare bins run high); sums unclamped (they pool without bias); means clamped to "
    "their clipping bound"
)
_SARCOPENIA_CELLS: Final = ("both_sarcopenic", "label_only", "test_only", "neither", "unknown")


def _laplace(value: float, scale: float, *, integer: bool) -> float:
    import opendp.prelude as dp

    dp.enable_features("contrib")
    if integer:
        measurement = dp.m.make_laplace(dp.atom_domain(T=int), dp.absolute_distance(T=int), scale=scale)
        return float(measurement(int(value)))
    measurement = dp.m.make_laplace(
        dp.atom_domain(T=float, nan=False), dp.absolute_distance(T=float), scale=scale
    )
    return float(measurement(float(value)))


def _clamp(value: float, bound: float) -> float:
    return min(max(value, -bound), bound)


@dataclass
class _Budget:
    """The reply's epsilon split over :data:`STATISTICS`, each spent at most once, and the record
    of what was noised (payload path -> expected error)."""

    epsilon: float
    k: int  #: slices per patient (the sensitivity of a count)
    noised: dict[str, float] = field(default_factory=dict)
    spent: list[str] = field(default_factory=list)

    def _spend(self, statistic: str) -> float:
        if statistic not in STATISTICS or statistic in self.spent:
            raise RuntimeError(
                f"DP statistic {statistic!r} is not in STATISTICS or was already released: "
                "the reply would spend more epsilon than the site's policy allows"
            )
        self.spent.append(statistic)
        return self.epsilon / len(STATISTICS)

    def histogram(self, statistic: str, cells: Mapping[str, int]) -> dict[str, int]:
        """Noised counts of one histogram (each slice in exactly one cell: sensitivity ``k`` in all)."""
        scale = self.k / self._spend(statistic)
        out = {}
        for path, value in cells.items():
            self.noised[path] = math.sqrt(2) * scale
            out[path] = max(0, round(_laplace(value, scale, integer=True)))
        return out

    def count(self, path: str, value: int) -> int:
        """One noised count (a histogram of one cell); ``path`` is its statistic."""
        return self.histogram(path, {path: value})[path]

    def total(self, statistic: str, path: str, value: float, bound: float) -> float:
        """A noised sum of per-slice values each within ``[-bound, bound]`` (or [0, bound])."""
        scale = self.k * bound / self._spend(statistic)
        self.noised[path] = math.sqrt(2) * scale
        return _laplace(value, scale, integer=False)


def n_statistics() -> int:
    """How many statistics one DP release noises (the reply's epsilon is split over them)."""
    return len(STATISTICS)


def bounded(records: Sequence[SliceRecord], max_per_patient: int) -> list[SliceRecord]:
    """At most ``max_per_patient`` slices of each patient, in order (bounds the sensitivity)."""
    seen: dict[str, int] = {}
    out = []
    for i, r in enumerate(records):
        key = r.group if r.group is not None else f"slice-{i}"
        if seen.get(key, 0) < max_per_patient:
            seen[key] = seen.get(key, 0) + 1
            out.append(r)
    return out


def private_payload(
    data: dict[str, Any],
    records: Sequence[SliceRecord],
    *,
    epsilon: float,
    max_per_patient: int,
    cutoff_set: str | None,
) -> tuple[dict[str, Any], list[str], DpRelease]:
    """The payload dict with its statistics replaced by their DP release (see module docstring).

    ``data`` is the payload as a dict (``model_dump(mode="json", by_alias=True)``) after the
    policy's other rules; ``records`` the per-slice records it was computed from (they never
    leave the site); ``cutoff_set`` the sarcopenia cut-offs of the exact reply (``None``: it
    had no sarcopenia calls, and the release has none). Returns the dict, the marks of what
    it withheld, and the ``dp`` record.
    """
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    kept = bounded(records, max_per_patient)
    budget = _Budget(epsilon, max_per_patient)
    marks: list[str] = []
    _withhold_counts(data, marks)
    data["n_used"] = budget.count("n_used", len(kept))
    for cls in METRIC_CLASSES:
        data["scores"][cls] = _noise_class(cls, kept, budget)
    marks += [f"scores.{c}.{part}" for c in METRIC_CLASSES for part in ("iou.sd", "dice", "pixels")]
    _noise_difference(data, kept, budget, marks)
    _noise_sarcopenia(data, kept, budget, cutoff_set)
    for path in ("harmonised_scores", "raw_scores", "discrepancy", "label_audit"):
        if data.get(path) is not None:
            data[path] = None
            marks.append(path)
    if data.get("findings"):
        data["findings"] = []
        marks.append("findings")
    release = DpRelease(
        epsilon=epsilon,
        delta=0.0,
        mechanism=MECHANISM,
        max_slices_per_patient=max_per_patient,
        noised={k: round(v, 6) for k, v in budget.noised.items()},
    )
    return data, marks, release


def _withhold_counts(data: dict[str, Any], marks: list[str]) -> None:
    """Exact counts that would give the noised slice count back, withheld whether or not empty
    (an empty ``excluded`` would say ``n_used == n_listed``)."""
    data["n_groups"] = 0
    data["excluded"] = {}
    marks += ["n_groups", "excluded"]
    if data.get("n_in_split") is not None:
        data["n_in_split"] = None
        marks.append("n_in_split")


def _noise_class(cls: str, kept: Sequence[SliceRecord], budget: _Budget) -> dict[str, Any]:
    """One class's scores: the noised IoU histogram (with the undefined count) and mean IoU."""
    counts = dict.fromkeys(IOU_BINS, 0)
    undefined = 0
    total_iou = 0.0
    for r in kept:
        iou = r.overlap[cls].iou_exact
        if iou is None:
            undefined += 1
        else:
            counts[bin_name(iou)] += 1
            total_iou += min(max(float(iou), 0.0), 1.0)
    prefix = f"scores.{cls}"
    cells = {f"{prefix}.bins.{b}": c for b, c in counts.items()} | {f"{prefix}.undefined": undefined}
    noisy = budget.histogram(f"{prefix}.histogram", cells)
    bins = {b: noisy[f"{prefix}.bins.{b}"] for b in counts}
    n_defined = sum(bins.values())
    noisy_sum = budget.total(f"{prefix}.iou_sum", f"{prefix}.iou.mean", total_iou, 1.0)
    return {
        "bins": bins,
        "undefined": noisy[f"{prefix}.undefined"],
        "iou": {"n": n_defined, "mean": min(max(noisy_sum / n_defined, 0.0), 1.0) if n_defined else None},
        "dice": {"n": 0},
        "intersection_px": 0,
        "union_px": 0,
    }


def _noise_difference(
    data: dict[str, Any], kept: Sequence[SliceRecord], budget: _Budget, marks: list[str]
) -> None:
    """The muscle area and SMI differences: noised sums, and means clamped to the clipping bound."""
    diffs = [_clamp(r.test_cm2["muscle"] - r.label_cm2["muscle"], AREA_CLIP_CM2) for r in kept]
    path = "areas.muscle.sum_diff_cm2"
    noisy_sum = budget.total(path, path, sum(diffs), AREA_CLIP_CM2)
    n_used = data["n_used"]
    data["areas"] = {
        "muscle": {
            "n": n_used,
            "mean_diff_cm2": _clamp(noisy_sum / n_used, AREA_CLIP_CM2) if n_used else None,
            "sum_diff_cm2": noisy_sum,
            "sum_sq_diff_cm2": None,
        }
    }
    marks += ["areas.muscle.sd", "areas.muscle.means", "areas.subcutaneous_fat", "areas.visceral_fat"]
    known = [(r.smi_test, r.smi_label) for r in kept if r.smi_label is not None and r.smi_test is not None]
    smi_diffs = [_clamp(test - label, SMI_CLIP) for test, label in known]
    noisy_n = budget.count("smi.n", len(known))
    noisy_smi = budget.total("smi.sum_diff", "smi.sum_diff", sum(smi_diffs), SMI_CLIP)
    data["smi"] = {
        "n": noisy_n,
        "mean_diff": _clamp(noisy_smi / noisy_n, SMI_CLIP) if noisy_n else None,
        "sum_diff": noisy_smi,
        "sum_sq_diff": None,
    }
    marks += ["smi.sd", "smi.means"]


def _noise_sarcopenia(
    data: dict[str, Any], kept: Sequence[SliceRecord], budget: _Budget, cutoff_set: str | None
) -> None:
    """The confusion counts of the kept slices (one histogram: each slice is in one cell)."""
    if cutoff_set is None:
        data["sarcopenia"] = None
        return
    exact = sarcopenia_confusion(kept, cutoff_set).model_dump(mode="json")
    noisy = budget.histogram(
        "sarcopenia", {f"sarcopenia.{cell}": int(exact[cell]) for cell in _SARCOPENIA_CELLS}
    )
    data["sarcopenia"] = exact | {cell: noisy[f"sarcopenia.{cell}"] for cell in _SARCOPENIA_CELLS}


__all__ = [
    "AREA_CLIP_CM2",
    "MECHANISM",
    "SMI_CLIP",
    "STATISTICS",
    "bounded",
    "n_statistics",
    "private_payload",
]
