"""Per-slice discrepancy analysis on hand-built masks: direction, region, boundary, density."""

from __future__ import annotations

import numpy as np
import pytest
from discrepancy_toy import toy_slice
from scipy import ndimage

from common.discrepancy import Key, analyse_slice

MUSCLE = 1


def _keys(result, tissue: str = "muscle") -> set[tuple[str, str]]:
    return {(k.direction, k.region) for k in result.stats if k.tissue == tissue}


def test_identical_masks_have_no_discrepancy() -> None:
    toy = toy_slice()
    result = analyse_slice(toy.hu, toy.spacing, toy.ref, toy.ref.copy())
    assert result.stats == {}
    assert result.spine_found is None  # no frame needed
    assert result.polar.sum() == 0
    assert result.class_area_cm2["muscle"] == pytest.approx((toy.ref == MUSCLE).sum() * 0.09)


def test_psoas_left_out_is_a_psoas_exclusion_of_muscle_density() -> None:
    toy = toy_slice(noise_sd=5.0)
    site = toy.ref.copy()
    site[toy.psoas] = 0
    result = analyse_slice(toy.hu, toy.spacing, site, toy.ref)
    assert _keys(result) == {("site_excludes", "psoas")}
    stat = result.stats[Key("muscle", "site_excludes", "psoas")]
    assert stat.n_px == toy.psoas.sum()
    assert stat.area_cm2 == pytest.approx(toy.psoas.sum() * 0.09)
    assert stat.n_class_density == stat.n_px  # 55 +- 5 HU: all in -29..150
    # the polar map holds the same area, all of it in the posterior half (psoas sits behind the centroid)
    excludes = result.polar[0, 0]
    assert excludes.sum() == pytest.approx(stat.area_cm2)
    n_angle = excludes.shape[0]
    assert excludes[n_angle // 4 : 3 * n_angle // 4].sum() == pytest.approx(stat.area_cm2)


def test_paraspinals_left_out_are_named_paraspinal_even_prone() -> None:
    toy = toy_slice(prone=True, angle_deg=10.0)
    site = toy.ref.copy()
    site[toy.paraspinal] = 0
    result = analyse_slice(toy.hu, toy.spacing, site, toy.ref)
    assert _keys(result) == {("site_excludes", "paraspinal")}


def test_contours_two_pixels_tight_are_boundary_only() -> None:
    toy = toy_slice()
    muscle = toy.ref == MUSCLE
    site = toy.ref.copy()
    site[muscle & ~ndimage.binary_erosion(muscle, iterations=2)] = 0
    result = analyse_slice(toy.hu, toy.spacing, site, toy.ref)
    assert _keys(result) == {("site_excludes", "boundary")}
    stat = result.stats[Key("muscle", "site_excludes", "boundary")]
    assert stat.n_px / result.perimeter_px["muscle"] == pytest.approx(2.0, abs=0.35)


def test_fat_inside_muscle_counted_as_muscle_is_intramuscular_fat() -> None:
    toy = toy_slice()
    rows, cols = np.nonzero(toy.paraspinal & ndimage.binary_erosion(toy.paraspinal, iterations=3))
    islands = np.zeros_like(toy.paraspinal)
    islands[rows[::7], cols[::7]] = True  # isolated fat pixels inside the paraspinals
    hu = toy.hu.copy()
    hu[islands] = -80.0
    ref = toy.ref.copy()
    ref[islands] = 0  # the reference cuts IMAT out of muscle
    result = analyse_slice(hu, toy.spacing, toy.ref, ref)  # the site keeps it as muscle
    assert _keys(result) == {("site_includes", "intramuscular_fat")}
    stat = result.stats[Key("muscle", "site_includes", "intramuscular_fat")]
    assert stat.n_px == islands.sum()
    assert stat.n_fat_density == stat.n_px and stat.n_class_density == 0


def test_added_region_is_named_and_fat_classes_have_no_anatomy() -> None:
    toy = toy_slice()
    site = toy.ref.copy()
    # the site calls a visceral-fat patch subcutaneous fat: SAT includes, VAT excludes, both 'other'
    patch = np.zeros_like(toy.psoas)
    patch[60:70, 40:50] = True
    patch &= toy.ref == 3
    site[patch] = 2
    result = analyse_slice(toy.hu, toy.spacing, site, toy.ref)
    assert _keys(result, "subcutaneous_fat") == {("site_includes", "other")}
    assert _keys(result, "visceral_fat") == {("site_excludes", "other")}
    assert result.stats[Key("visceral_fat", "site_excludes", "other")].n_class_density == patch.sum()


def test_bad_inputs_are_refused_with_the_values() -> None:
    toy = toy_slice()
    with pytest.raises(ValueError, match="one shape"):
        analyse_slice(toy.hu, toy.spacing, toy.ref[:-1], toy.ref)
    bad = toy.ref.copy()
    bad[0, 0] = 7
    with pytest.raises(ValueError, match="found value 7"):
        analyse_slice(toy.hu, toy.spacing, bad, toy.ref)
    with pytest.raises(ValueError, match="spacing_mm"):
        analyse_slice(toy.hu, (0.0, 1.0), toy.ref, toy.ref)
