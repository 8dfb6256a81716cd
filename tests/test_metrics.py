"""common.metrics on tiny hand-checkable masks."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from common.metrics import (
    ClassOverlap,
    bin_counts,
    bin_name,
    confusion_matrix,
    dice_from_iou,
    iou_dice_per_class,
    iou_from_dice,
    mean_hu,
    overlap_counts,
    smi,
    summarise,
    tissue_areas_cm2,
)

M, S, V = 1, 2, 3


def test_iou_and_dice_per_class_on_a_4x4_case() -> None:
    label = np.array([[M, M, M, M], [M, M, 0, 0], [S, S, S, S], [V, V, 0, 0]], dtype=np.uint8)
    test = np.array([[M, M, M, 0], [M, M, M, 0], [S, S, S, 0], [V, V, V, V]], dtype=np.uint8)
    counts = overlap_counts(test, label)
    # muscle: label 6 px, test 6 px, 5 in both -> I=5, U=7
    assert counts["muscle"] == ClassOverlap(intersection=5, union=7, test_px=6, label_px=6)
    assert counts["muscle"].iou == pytest.approx(5 / 7)
    assert counts["muscle"].dice == pytest.approx(10 / 12)
    # SAT: label 4, test 3, all 3 inside -> 3/4
    assert counts["subcutaneous_fat"].iou == pytest.approx(3 / 4)
    assert counts["subcutaneous_fat"].dice == pytest.approx(6 / 7)
    # VAT: label 2, test 4 -> 2/4
    assert counts["visceral_fat"].iou == pytest.approx(0.5)
    assert counts["msv"].intersection == 5 + 3 + 2
    assert counts["msv"].union == 7 + 4 + 4


def test_msv_is_sum_of_intersections_over_sum_of_unions_not_union_mask_iou() -> None:
    # Every pixel is tissue in both masks, but muscle and SAT are swapped on half of them.
    label = np.array([[M, M], [S, S]], dtype=np.uint8)
    test = np.array([[M, S], [S, M]], dtype=np.uint8)
    counts = overlap_counts(test, label)
    union_mask_iou = np.logical_and(test > 0, label > 0).sum() / np.logical_or(test > 0, label > 0).sum()
    assert union_mask_iou == 1.0
    # muscle I=1 U=3, SAT I=1 U=3, VAT empty -> (1+1)/(3+3)
    assert counts["msv"].iou == pytest.approx(2 / 6)
    assert counts["msv"].dice == pytest.approx(2 * 2 / 8)


def test_class_empty_in_both_masks_is_undefined_not_one_or_zero() -> None:
    label = np.array([[M, 0], [0, 0]], dtype=np.uint8)
    test = np.array([[M, 0], [0, S]], dtype=np.uint8)
    scores = iou_dice_per_class(test, label)
    assert scores["muscle"] == (1.0, 1.0)
    assert scores["subcutaneous_fat"] == (0.0, 0.0)  # present in one mask only: a real 0
    assert scores["visceral_fat"] == (None, None)
    assert overlap_counts(test, label)["visceral_fat"].iou_exact is None


def test_confusion_matrix_counts_every_pixel_once_and_rejects_bad_input() -> None:
    rng = np.random.default_rng(1)
    test = rng.integers(0, 4, (16, 16)).astype(np.int64)
    label = rng.integers(0, 4, (16, 16)).astype(np.uint8)
    matrix = confusion_matrix(test, label)
    assert matrix.sum() == 256
    assert matrix[2, 3] == np.sum((test == 2) & (label == 3))
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(test, label[:8])
    with pytest.raises(ValueError, match=r"values \[7\]"):
        confusion_matrix(np.full((2, 2), 7, dtype=np.uint8), np.zeros((2, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"values \[-1\]"):
        overlap_counts(np.zeros((2, 2), np.int8), np.full((2, 2), -1, np.int8))


@pytest.mark.parametrize(
    ("iou", "expected"),
    [
        (1.0, "[0.9,1.0]"),
        (0.9, "[0.9,1.0]"),
        (0.8999999, "[0.8,0.9)"),
        (0.8, "[0.8,0.9)"),
        (0.7, "[0.7,0.8)"),
        (0.6999, "[0,0.7)"),
        (0.0, "[0,0.7)"),
        (Fraction(9, 10), "[0.9,1.0]"),
        (Fraction(899_999, 1_000_000), "[0.8,0.9)"),
        (Fraction(7, 10), "[0.7,0.8)"),
    ],
)
def test_bin_edges(iou: float | Fraction, expected: str) -> None:
    assert bin_name(iou) == expected


def test_exact_ratio_at_an_edge_bins_up_from_counts() -> None:
    # I/U = 27/30 and 63/90 are exactly 0.9 and 0.7: they belong to the upper bin.
    assert bin_name(ClassOverlap(27, 30, 27, 30).iou_exact) == "[0.9,1.0]"  # type: ignore[arg-type]
    assert bin_name(ClassOverlap(63, 90, 63, 90).iou_exact) == "[0.7,0.8)"  # type: ignore[arg-type]
    assert bin_name(27 / 30) == "[0.9,1.0]"


@pytest.mark.parametrize("bad", [-0.01, 1.01, float("nan"), Fraction(11, 10)])
def test_bin_name_rejects_values_outside_unit_interval(bad: float) -> None:
    with pytest.raises(ValueError, match="IoU must be within"):
        bin_name(bad)


def test_bin_counts_keeps_every_bin_and_counts_undefined() -> None:
    counts, undefined = bin_counts([0.95, None, 0.85, 0.5, None, 0.9])
    assert counts == {"[0.9,1.0]": 2, "[0.8,0.9)": 1, "[0.7,0.8)": 0, "[0,0.7)": 1}
    assert list(counts) == ["[0.9,1.0]", "[0.8,0.9)", "[0.7,0.8)", "[0,0.7)"]
    assert undefined == 2


def test_areas_with_anisotropic_spacing() -> None:
    mask = np.array([[M, M, S], [V, 0, 0]], dtype=np.uint8)
    areas = tissue_areas_cm2(mask, (0.5, 2.0))  # 1 mm^2 per pixel = 0.01 cm^2
    assert areas == pytest.approx({"muscle": 0.02, "subcutaneous_fat": 0.01, "visceral_fat": 0.01})
    areas = tissue_areas_cm2(mask, (0.8, 0.6))  # 0.48 mm^2 per pixel
    assert areas["muscle"] == pytest.approx(2 * 0.0048)
    with pytest.raises(ValueError, match="spacing"):
        tissue_areas_cm2(mask, (0.0, 1.0))


def test_mean_hu_per_tissue_and_none_when_absent() -> None:
    mask = np.array([[M, M], [S, 0]], dtype=np.uint8)
    hu = np.array([[40.0, 60.0], [-100.0, 500.0]], dtype=np.float32)
    assert mean_hu(mask, hu) == {"muscle": 50.0, "subcutaneous_fat": -100.0, "visceral_fat": None}


def test_smi() -> None:
    assert smi(160.0, 1.6) == pytest.approx(62.5)
    with pytest.raises(ValueError, match="height"):
        smi(160.0, 0.0)


def test_summarise_uses_sample_sd_and_linear_quartiles() -> None:
    d = summarise([1.0, 2.0, 3.0, 4.0])
    assert d.n == 4
    assert d.mean == pytest.approx(2.5)
    assert d.sd == pytest.approx(np.sqrt(5 / 3))  # ddof=1
    assert (d.q1, d.median, d.q3) == pytest.approx((1.75, 2.5, 3.25))
    one = summarise([0.8])
    assert (one.n, one.mean, one.sd, one.median) == (1, 0.8, None, 0.8)
    assert summarise([]).model_dump() == {
        "n": 0,
        "mean": None,
        "sd": None,
        "median": None,
        "q1": None,
        "q3": None,
    }
    with pytest.raises(ValueError, match="NaN"):
        summarise([0.5, float("nan")])


def test_iou_dice_conversion() -> None:
    assert iou_from_dice(2 * 0.9 / 1.9) == pytest.approx(0.9)
    assert dice_from_iou(0.9) == pytest.approx(0.947368, abs=1e-6)
    assert iou_from_dice(dice_from_iou(0.37)) == pytest.approx(0.37)
    assert iou_from_dice(1.0) == 1.0 and iou_from_dice(0.0) == 0.0
    with pytest.raises(ValueError):
        iou_from_dice(1.5)
