"""Site aggregation: systematic conventions become findings, scattered disagreement does not."""

from __future__ import annotations

import numpy as np
import pytest
from discrepancy_toy import toy_slice
from scipy import ndimage

from common.discrepancy import DiscrepancyAccumulator, analyse_slice


def _site(kind: str, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, float]]:
    """(hu, site, ref) for one slice of a site with convention ``kind``; poses vary by seed."""
    rng = np.random.default_rng(seed)
    toy = toy_slice(angle_deg=float(rng.uniform(-15, 15)), noise_sd=8.0, seed=seed)
    site = toy.ref.copy()
    muscle = toy.ref == 1
    if kind == "psoas":
        site[toy.psoas] = 0
    elif kind == "tight":
        site[muscle & ~ndimage.binary_erosion(muscle, iterations=2)] = 0
    elif kind == "jitter":  # a reader (or model) whose muscle contour wobbles by 1 px both ways
        outer = ndimage.binary_dilation(muscle) & ~muscle & (toy.ref > 0)
        inner = muscle & ~ndimage.binary_erosion(muscle)
        _, (nr, nc) = ndimage.distance_transform_edt(muscle, return_indices=True)
        neighbour = toy.ref[nr, nc]  # the class just outside the muscle
        grow = outer & (rng.random(muscle.shape) < 0.5)
        shrink = inner & (rng.random(muscle.shape) < 0.5) & (neighbour > 0)
        site[grow] = 1
        site[shrink] = neighbour[shrink]
    return toy.hu, site, toy.ref, toy.spacing


def _summary(kinds: list[str], min_slices: int = 5):
    acc = DiscrepancyAccumulator()
    for seed, kind in enumerate(kinds):
        hu, site, ref, spacing = _site(kind, seed)
        acc.add(analyse_slice(hu, spacing, site, ref))
    return acc.finalise(min_slices=min_slices)


def _systematic(summary) -> set[tuple[str, str, str]]:
    return {(f.tissue, f.direction, f.region) for f in summary.findings if f.systematic}


def test_psoas_left_out_on_every_slice_is_one_systematic_finding() -> None:
    summary = _summary(["psoas"] * 6)
    assert _systematic(summary) == {("muscle", "site_excludes", "psoas")}
    (finding,) = summary.findings
    assert finding.prevalence == 1.0 and finding.n_slices == 6
    assert finding.density_consistency > 0.95
    assert "psoas" in finding.sentence and "100% of 6 slices" in finding.sentence
    assert "definition likely excludes psoas" in finding.sentence
    assert summary.region_area_share["muscle:site_excludes:psoas"] == pytest.approx(finding.mean_area_share)
    assert finding.model_dump(by_alias=True)["class"] == "muscle"


def test_tight_contours_are_systematic_boundary_but_jitter_is_not() -> None:
    tight = _summary(["tight"] * 6)
    assert _systematic(tight) == {("muscle", "site_excludes", "boundary")}
    assert "tighter" in tight.findings[0].sentence
    jitter = _summary(["jitter"] * 6)
    assert _systematic(jitter) == set()
    boundary = jitter.region_area_share["muscle:site_excludes:boundary"]
    assert boundary > 0.02  # plenty of disagreement, just not one-sided


def test_identical_labels_give_no_finding_but_a_map() -> None:
    summary = _summary(["same"] * 5)
    assert summary.findings == [] and summary.region_area_share == {}
    assert summary.polar is not None and summary.polar.n_slices == 5
    assert set(summary.polar.maps) == {
        f"{t}:{d}"
        for t in ("muscle", "subcutaneous_fat", "visceral_fat")
        for d in ("site_excludes", "site_includes")
    }


def test_an_occasional_difference_is_reported_as_scattered() -> None:
    summary = _summary(["psoas", "same", "same", "psoas", "same", "same"])
    (finding,) = summary.findings
    assert finding.region == "psoas" and not finding.systematic
    assert finding.prevalence == pytest.approx(2 / 6)
    assert "not systematic" in finding.sentence


def test_too_few_slices_release_only_the_count() -> None:
    summary = _summary(["psoas"] * 3, min_slices=5)
    assert summary.n_slices == 3
    assert summary.findings == [] and summary.polar is None and summary.region_area_share == {}
    assert "discrepancy.polar" in summary.suppressed
    summary.model_dump_json()  # still a valid payload part


def test_polar_maps_add_up_over_slices() -> None:
    summary = _summary(["psoas"] * 5)
    total = np.asarray(summary.polar.maps["muscle:site_excludes"]).sum()
    finding = summary.findings[0]
    assert total == pytest.approx(finding.mean_area_cm2 * 5)


def _small_imat(seed: int):
    """A site that counts small fat islands in the back muscles as muscle (~1.5% of muscle area)."""
    rng = np.random.default_rng(seed)
    toy = toy_slice(angle_deg=float(rng.uniform(-15, 15)), noise_sd=8.0, seed=seed)
    hu, ref = toy.hu.copy(), toy.ref.copy()
    inner = ndimage.binary_erosion(toy.paraspinal, iterations=3)
    rows, cols = np.nonzero(inner)
    pick = rng.choice(rows.size, size=int(0.015 * (toy.ref == 1).sum()), replace=False)
    hu[rows[pick], cols[pick]] = -80.0
    ref[rows[pick], cols[pick]] = 0  # the reference cuts fat out of muscle; the site does not
    return hu, toy.ref, ref, toy.spacing


def test_a_small_difference_on_every_slice_is_systematic_with_a_small_size() -> None:
    """Consistency, not size, makes a finding systematic (the old 2%-of-area rule missed this)."""
    acc = DiscrepancyAccumulator()
    for seed in range(8):
        hu, site, ref, spacing = _small_imat(seed)
        acc.add(analyse_slice(hu, spacing, site, ref))
    summary = acc.finalise()
    (finding,) = [f for f in summary.findings if f.systematic]
    assert (finding.tissue, finding.direction, finding.region) == (
        "muscle",
        "site_includes",
        "intramuscular_fat",
    )
    assert finding.mean_area_share < 0.02 and finding.n_present == 8
    assert finding.prevalence_low is not None and finding.prevalence_low > 0.5
    assert finding.net_area_low_cm2 is not None and finding.net_area_low_cm2 > 0


def test_large_disagreement_on_a_third_of_the_slices_is_not_systematic() -> None:
    summary = _summary(["psoas", "same", "same"] * 3)
    (finding,) = summary.findings
    assert finding.mean_area_share > 0.02 and not finding.systematic
    stats = summary.key_stats["muscle:site_excludes:psoas"]
    assert (stats.n, stats.n_present) == (9, 3)
