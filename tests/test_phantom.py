"""The synthetic L3 phantom: plausible anatomy, realistic HU, conventions that do what they say."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import ndimage

from common.demo.phantom import (
    REFERENCE,
    LabelConvention,
    Structure,
    apply_scanner,
    canonical_labels,
    imat_mask,
    make_patient,
    next_level,
    render_l3,
)
from protocols.classes import Tissue

SIZE, FOV = 192, 400.0


@pytest.fixture(scope="module")
def slices() -> list[tuple[object, np.ndarray, np.ndarray]]:
    """Four patients: (anatomy, structures, HU after a typical scanner)."""
    out = []
    for seed in range(4):
        anatomy = make_patient(np.random.default_rng(seed))
        phantom = render_l3(anatomy, SIZE, FOV)
        hu = apply_scanner(phantom.hu, np.random.default_rng(100 + seed), noise_sd=14.0, blur_sigma_px=0.5)
        out.append((anatomy, phantom.structures, hu))
    return out


def _cm2(mask: np.ndarray, size: int = SIZE, fov: float = FOV) -> float:
    return float(mask.sum()) * (fov / size) ** 2 / 100.0


def test_same_seed_same_patient_and_image() -> None:
    a1, a2 = make_patient(np.random.default_rng(7)), make_patient(np.random.default_rng(7))
    assert a1 == a2
    assert make_patient(np.random.default_rng(8)) != a1
    p1, p2 = render_l3(a1, 96, 380.0), render_l3(a2, 96, 380.0)
    np.testing.assert_array_equal(p1.hu, p2.hu)
    np.testing.assert_array_equal(p1.structures, p2.structures)
    n1 = apply_scanner(p1.hu, np.random.default_rng(1), 10.0, 0.5)
    n2 = apply_scanner(p1.hu, np.random.default_rng(1), 10.0, 0.5)
    np.testing.assert_array_equal(n1, n2)


def test_tissue_areas_are_plausible_for_an_adult_l3(slices) -> None:
    for anatomy, structures, hu in slices:
        labels = canonical_labels(structures, REFERENCE, hu)
        muscle, sat, vat = (_cm2(labels == t) for t in (1, 2, 3))
        assert 60 < muscle < 260, (anatomy.sex, muscle)
        assert 15 < sat < 500 and 10 < vat < 400, (sat, vat)
        smi = muscle / anatomy.height_m**2
        assert 20 < smi < 80
        # every structure that should be in an L3 slice is there
        present = set(np.unique(structures).tolist())
        for s in (
            Structure.psoas,
            Structure.paraspinal,
            Structure.quadratus_lumborum,
            Structure.spinal_canal,
        ):
            assert s in present
        assert Structure.vertebral_body in present and Structure.posterior_elements in present


def test_men_have_more_muscle_than_women_on_average() -> None:
    areas: dict[str, list[float]] = {"M": [], "F": []}
    rng = np.random.default_rng(11)
    for _ in range(16):
        anatomy = make_patient(rng)
        phantom = render_l3(anatomy, 128, 420.0)
        muscle = canonical_labels(phantom.structures, REFERENCE, phantom.hu) == Tissue.muscle
        areas[anatomy.sex].append(_cm2(muscle, 128, 420.0))
    assert areas["M"] and areas["F"]
    assert np.mean(areas["M"]) > np.mean(areas["F"]) + 15


def test_structure_hu_fall_in_the_alberta_ranges(slices) -> None:
    checks = [
        ((Structure.abdominal_wall_muscle, Structure.psoas, Structure.paraspinal), (-29, 150), 0.95),
        ((Structure.subcutaneous_fat,), (-190, -30), 0.95),
        ((Structure.visceral_fat,), (-150, -50), 0.90),
    ]
    for _, structures, hu in slices:
        for members, (lo, hi), share in checks:
            # one pixel in from each structure's edge, away from partial volume
            mask = ndimage.binary_erosion(np.isin(structures, members))
            values = hu[mask]
            assert values.size > 50
            assert np.mean((values >= lo) & (values <= hi)) >= share, (members, values.mean())
        gas = ndimage.binary_erosion(structures == Structure.bowel_gas)
        if gas.any():
            assert hu[gas].mean() < -800
        assert hu[ndimage.binary_erosion(structures == Structure.vertebral_body)].mean() > 100
        assert hu[structures == Structure.air].mean() < -950


def test_reference_labels_respect_hu_ranges_and_leave_imat_out(slices) -> None:
    for _, structures, hu in slices:
        labels = canonical_labels(structures, REFERENCE, hu)
        muscle = labels == Tissue.muscle
        assert ((hu[muscle] >= -29) & (hu[muscle] <= 150)).all()
        assert not (muscle & (structures == Structure.intramuscular_fat)).any()
        assert not (labels[structures == Structure.fascia]).any()  # linea alba is not muscle
        sat = labels == Tissue.subcutaneous_fat
        assert ((hu[sat] >= -190) & (hu[sat] <= -30)).all()
        assert (structures[sat] == Structure.subcutaneous_fat).all()
        # IMAT marked by a Slice-O-Matic reader: fat inside muscle, never muscle itself
        imat = imat_mask(structures, REFERENCE, hu)
        assert imat.any() and not (imat & muscle).any()


def test_psoas_left_out_has_no_muscle_on_psoas(slices) -> None:
    no_psoas = LabelConvention(include_psoas=False)
    for _, structures, hu in slices:
        ref = canonical_labels(structures, REFERENCE, hu) == Tissue.muscle
        site = canonical_labels(structures, no_psoas, hu) == Tissue.muscle
        psoas = structures == Structure.psoas
        assert psoas.sum() > 100
        assert not (site & psoas).any()
        assert np.array_equal(site, ref & ~psoas)
        # counting IMAT as muscle must not bring back fat inside the left-out psoas
        both = LabelConvention(include_psoas=False, imat_as_muscle=True, muscle_hu_range=None)
        site_imat = canonical_labels(structures, both, hu) == Tissue.muscle
        inside_psoas = ndimage.binary_fill_holes(psoas) & ~psoas
        assert not (site_imat & (inside_psoas | psoas)).any()


def test_paraspinals_left_out(slices) -> None:
    convention = LabelConvention(include_paraspinal=False)
    for _, structures, hu in slices:
        site = canonical_labels(structures, convention, hu) == Tissue.muscle
        assert not (site & (structures == Structure.paraspinal)).any()
        assert (site & (structures == Structure.psoas)).any()


def test_imat_as_muscle_adds_the_fat_islands(slices) -> None:
    convention = LabelConvention(imat_as_muscle=True, muscle_hu_range=None)
    for _, structures, hu in slices:
        ref = canonical_labels(structures, REFERENCE, hu) == Tissue.muscle
        site = canonical_labels(structures, convention, hu) == Tissue.muscle
        islands = structures == Structure.intramuscular_fat
        assert islands.sum() > 10
        assert (site[islands]).all() and not (ref[islands]).any()
        assert site.sum() >= ref.sum() + islands.sum()
        assert not imat_mask(structures, convention, hu).any()


def test_tight_contours_remove_a_two_pixel_band(slices) -> None:
    tight = dataclasses.replace(REFERENCE, contour_erosion_px=2)
    for _, structures, hu in slices:
        ref = canonical_labels(structures, REFERENCE, hu) == Tissue.muscle
        site = canonical_labels(structures, tight, hu) == Tissue.muscle
        assert not (site & ~ref).any()
        # taxicab distance from the outer contour (holes cut out for IMAT do not count)
        inward = ndimage.distance_transform_cdt(ndimage.binary_fill_holes(ref), metric="taxicab")
        removed = ref & ~site
        assert removed.any() and (inward[removed] <= 2).all()
        assert site[ref & (inward > 2)].all()
        assert 0.1 < removed.sum() / ref.sum() < 0.75  # thin walls lose much at 2 mm pixels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_areas_in_cm2_do_not_depend_on_pixel_spacing(seed: int) -> None:
    anatomy = make_patient(np.random.default_rng(seed))
    areas = []
    for size, fov in ((256, 400.0), (384, 400.0), (192, 460.0)):
        phantom = render_l3(anatomy, size, fov)
        labels = canonical_labels(phantom.structures, REFERENCE, phantom.hu)
        areas.append([float((labels == t).sum()) * phantom.pixel_area_cm2 for t in (1, 2, 3)])
    base = np.array(areas[0])
    for other in areas[1:]:
        np.testing.assert_allclose(other, base, rtol=0.05)


def test_second_level_is_the_same_patient_slightly_changed() -> None:
    rng = np.random.default_rng(3)
    first = make_patient(rng)
    second = next_level(first, rng)
    assert (second.sex, second.height_m, second.body_a) == (first.sex, first.height_m, first.body_a)
    assert second.psoas[0].a > first.psoas[0].a
    assert second.texture_seed != first.texture_seed


def test_scanner_noise_and_blur() -> None:
    flat = np.full((128, 128), 40.0, dtype=np.float32)
    noisy = apply_scanner(flat, np.random.default_rng(0), noise_sd=15.0, blur_sigma_px=0.0)
    assert abs(float(noisy.std()) - 15.0) < 1.5 and abs(float(noisy.mean()) - 40.0) < 1.0
    np.testing.assert_array_equal(apply_scanner(flat, np.random.default_rng(0), 0.0, 0.0), flat)
    edge = np.where(np.arange(64)[None, :] < 32, -100.0, 50.0).repeat(8, axis=0).astype(np.float32)
    blurred = apply_scanner(edge, np.random.default_rng(0), 0.0, 1.5)
    assert -100 < blurred[0, 31] < blurred[0, 32] < 50  # partial volume across the edge
    with pytest.raises(ValueError, match="noise_sd"):
        apply_scanner(flat, np.random.default_rng(0), -1.0, 0.0)


def test_bad_inputs_are_refused() -> None:
    structures = np.zeros((8, 8), dtype=np.uint8)
    with pytest.raises(ValueError, match="hu="):
        canonical_labels(structures, REFERENCE)  # thresholds need the image
    no_thresholds = LabelConvention(muscle_hu_range=None, sat_hu_range=None, vat_hu_range=None)
    assert not canonical_labels(structures, no_thresholds).any()
    with pytest.raises(ValueError, match="contour_erosion_px"):
        LabelConvention(contour_erosion_px=-1)
    with pytest.raises(ValueError, match="vat_hu_range"):
        LabelConvention(vat_hu_range=(-50.0, -150.0))
    with pytest.raises(ValueError, match="size"):
        render_l3(make_patient(np.random.default_rng(0)), 8, 400.0)
