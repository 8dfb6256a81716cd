"""Differentially private release of a site's aggregates, when the site's policy asks for it.

With ``[aggregate-dp] enabled = true`` in policy.toml, an evaluation or comparison reply
leaves as an epsilon-differentially private release (pure DP, delta = 0) with respect to
adding or removing one patient: the Laplace mechanism of OpenDP on counts and on clipped
sums, the reply's epsilon split equally over the released statistics (basic composition).
A patient contributes at most ``max-slices-per-patient`` slices (extra slices are left out
of the release, so the sensitivity is bounded whatever the data).

Released, noised (each with its expected error, the Laplace sd, in ``dp.noised``):

- ``n_used``; per class the IoU-bin histogram with the undefined count; per class the mean
  IoU (noisy sum of per-slice IoU clipped to [0, 1] over the noisy defined count);
- muscle area difference (test - label) and SMI difference: means of values clipped to
  ``+-AREA_CLIP_CM2`` / ``+-SMI_CLIP``;
- the sarcopenia confusion counts.

Withheld (marked in ``suppressed``: a per-slice sensitivity makes them useless or unsafe to
noise): Dice, standard deviations (and so limits of agreement), pixel counts, other tissues'
areas, harmonised and raw scores, the discrepancy analysis, findings and the label audit.
Pooling noised sums is exact in expectation: bins add, ``n * mean`` is the noisy sum.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from common.evaluation import SliceRecord, sarcopenia_confusion
from common.metrics import bin_name
from protocols.classes import IOU_BINS, METRIC_CLASSES
from protocols.payloads import DpRelease

#: Per-slice clipping bounds of the noised means.
AREA_CLIP_CM2: Final = 50.0
SMI_CLIP: Final = 15.0
#: What is withheld from a DP release (payload paths, as in ``suppressed``).
WITHHELD: Final[tuple[str, ...]] = (
    "dice",
    "sd",
    "pixels",
    "areas.subcutaneous_fat",
    "areas.visceral_fat",
    "harmonised_scores",
    "raw_scores",
    "discrepancy",
    "findings",
    "label_audit",
)


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


@dataclass
class _Budget:
    """Epsilon per statistic and the record of what was noised."""

    epsilon_each: float
    k: int  #: slices per patient (the sensitivity of a count)
    noised: dict[str, float]

    def count(self, path: str, value: int) -> int:
        scale = self.k / self.epsilon_each
        self.noised[path] = math.sqrt(2) * scale
        return max(0, round(_laplace(value, scale, integer=True)))

    def total(self, path: str, value: float, bound: float) -> float:
        """A sum of per-slice values each within ``[-bound, bound]`` (or [0, bound])."""
        scale = self.k * bound / self.epsilon_each
        self.noised[path] = math.sqrt(2) * scale
        return _laplace(value, scale, integer=False)


def n_statistics() -> int:
    """How many statistics one DP release noises (the reply's epsilon is split over them)."""
    classes = len(METRIC_CLASSES)
    # n; per class the bin histogram and the IoU sum; the muscle area difference; the SMI count
    # and difference; the sarcopenia histogram
    return 1 + classes * 2 + 1 + 2 + 1


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
    cutoff_set: str,
) -> tuple[dict[str, Any], list[str], DpRelease]:
    """The payload dict with its statistics replaced by their DP release (see module docstring).

    ``data`` is the exact payload as a dict (``model_dump(mode="json", by_alias=True)``);
    ``records`` the per-slice records it was computed from (they never leave the site).
    """
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    kept = bounded(records, max_per_patient)
    budget = _Budget(epsilon / n_statistics(), max_per_patient, {})
    marks: list[str] = []
    data["n_used"] = budget.count("n_used", len(kept))
    data["n_groups"] = 0
    marks.append("n_groups")
    for cls in METRIC_CLASSES:
        scores = data["scores"][cls]
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
        scores["bins"] = {b: budget.count(f"scores.{cls}.bins.{b}", c) for b, c in counts.items()}
        scores["undefined"] = budget_split_undefined(budget, cls, undefined)
        n_defined = sum(scores["bins"].values())
        noisy = budget.total(f"scores.{cls}.iou.mean", total_iou, 1.0)
        scores["iou"] = {"n": n_defined, "mean": min(max(noisy / n_defined, 0.0), 1.0) if n_defined else None}
        scores["dice"] = {"n": 0}
        scores["intersection_px"] = scores["union_px"] = 0
    marks += [f"scores.{c}.{part}" for c in METRIC_CLASSES for part in ("dice", "pixels")]
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
        mechanism="Laplace (OpenDP), basic composition over the released statistics",
        max_slices_per_patient=max_per_patient,
        noised={k: round(v, 6) for k, v in budget.noised.items()},
    )
    return data, marks, release


def budget_split_undefined(budget: _Budget, cls: str, undefined: int) -> int:
    """The undefined count travels in the class's histogram: same noise, no extra epsilon."""
    scale = budget.k / budget.epsilon_each
    budget.noised[f"scores.{cls}.undefined"] = math.sqrt(2) * scale
    return max(0, round(_laplace(undefined, scale, integer=True)))


def _noise_difference(
    data: dict[str, Any], kept: Sequence[SliceRecord], budget: _Budget, marks: list[str]
) -> None:
    diffs = [
        min(max(r.test_cm2["muscle"] - r.label_cm2["muscle"], -AREA_CLIP_CM2), AREA_CLIP_CM2) for r in kept
    ]
    n = len(kept)
    noisy_sum = budget.total("areas.muscle.sum_diff_cm2", sum(diffs), AREA_CLIP_CM2)
    data["areas"] = {
        "muscle": {
            "n": data["n_used"],
            "mean_diff_cm2": noisy_sum / data["n_used"] if data["n_used"] else None,
            "sum_diff_cm2": noisy_sum,
            "sum_sq_diff_cm2": None,
        }
    }
    marks += ["areas.muscle.sd", "areas.subcutaneous_fat", "areas.visceral_fat"]
    known = [r for r in kept if r.smi_label is not None and r.smi_test is not None]
    smi_diffs = [min(max(r.smi_test - r.smi_label, -SMI_CLIP), SMI_CLIP) for r in known]  # type: ignore[operator]
    noisy_n = budget.count("smi.n", len(known)) if n else 0
    noisy_smi = budget.total("smi.sum_diff", sum(smi_diffs), SMI_CLIP)
    data["smi"] = {
        "n": noisy_n,
        "mean_diff": noisy_smi / noisy_n if noisy_n else None,
        "sum_diff": noisy_smi,
        "sum_sq_diff": None,
    }
    marks.append("smi.sd")


def _noise_sarcopenia(
    data: dict[str, Any], kept: Sequence[SliceRecord], budget: _Budget, cutoff_set: str
) -> None:
    """The confusion counts of the kept slices (one histogram: each slice is in one cell)."""
    exact = sarcopenia_confusion(kept, cutoff_set).model_dump(mode="json")
    scale = budget.k / budget.epsilon_each
    for cell in ("both_sarcopenic", "label_only", "test_only", "neither", "unknown"):
        budget.noised[f"sarcopenia.{cell}"] = math.sqrt(2) * scale
        exact[cell] = max(0, round(_laplace(int(exact[cell]), scale, integer=True)))
    data["sarcopenia"] = exact


__all__ = ["AREA_CLIP_CM2", "SMI_CLIP", "WITHHELD", "bounded", "n_statistics", "private_payload"]
