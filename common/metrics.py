"""Per-slice overlap, area and density metrics of the seed paper, as pure numpy functions.

Conventions (MONAI-like, explicit about empty classes):

- Masks are 2-D integer arrays in canonical values (0 background, 1 muscle,
  2 subcutaneous fat, 3 visceral fat); ``test`` is the model (or reference) mask and
  ``label`` is the site's label, taken as truth.
- For one class, ``I`` = pixels that are that class in both masks, ``U`` = pixels that are
  that class in either. IoU = I / U, Dice = 2I / (|test| + |label|).
- A class empty in **both** masks has no IoU and no Dice (``None``). It is counted apart as
  *undefined*, never as 1 or 0. A class present in one mask only has IoU 0.
- ``msv`` (the seed's "MSV" column) = sum over the three tissues of I divided by the sum of
  their U. This is **not** the IoU of the union mask (which would ignore a muscle pixel
  called fat): a pixel counts as agreeing only when both masks give it the same tissue.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from protocols.classes import IOU_BINS, METRIC_CLASSES, TISSUES
from protocols.payloads import Distribution

#: Exact lower edges of the seed's bins (as rationals, so 9/10 is exactly 0.9).
_BIN_EDGES_EXACT: tuple[Fraction, ...] = (Fraction(9, 10), Fraction(8, 10), Fraction(7, 10), Fraction(0))
#: The same edges as the nearest doubles, for float input.
_BIN_EDGES_FLOAT: tuple[float, ...] = (0.9, 0.8, 0.7, 0.0)
_N_CANONICAL = 4  # background + three tissues


@dataclass(frozen=True)
class ClassOverlap:
    """Pixel counts of one metric class on one slice (or pooled over slices)."""

    intersection: int
    union: int
    test_px: int
    label_px: int

    @property
    def defined(self) -> bool:
        """False when the class is empty in both masks."""
        return self.union > 0

    @property
    def iou(self) -> float | None:
        """I / U, or None when the class is empty in both masks."""
        return self.intersection / self.union if self.union else None

    @property
    def iou_exact(self) -> Fraction | None:
        """I / U as an exact rational (for binning without floating error), or None."""
        return Fraction(self.intersection, self.union) if self.union else None

    @property
    def dice(self) -> float | None:
        """2I / (|test| + |label|), or None when the class is empty in both masks."""
        total = self.test_px + self.label_px
        return 2 * self.intersection / total if total else None


@dataclass(frozen=True)
class OverlapCounts:
    """Overlap counts of one slice, keyed by ``protocols.classes.METRIC_CLASSES``."""

    classes: dict[str, ClassOverlap]

    def __getitem__(self, name: str) -> ClassOverlap:
        return self.classes[name]


def _check_mask(mask: np.ndarray, name: str) -> None:
    """A 2-D integer mask holding only canonical values 0..3."""
    if mask.ndim != 2:
        raise ValueError(f"{name} mask must be 2-D (H x W), got shape {mask.shape}")
    if mask.dtype.kind not in "iub":
        raise ValueError(f"{name} mask must hold integers (canonical 0-3), got dtype {mask.dtype}")
    if mask.size and (int(mask.min()) < 0 or int(mask.max()) >= _N_CANONICAL):
        bad = sorted(int(v) for v in np.unique(mask) if v < 0 or v >= _N_CANONICAL)
        raise ValueError(f"{name} mask holds values {bad}; canonical masks hold only 0, 1, 2, 3")


def _canonical_bincount(mask: np.ndarray, name: str, weights: np.ndarray | None = None) -> np.ndarray:
    """Pixel count (or weight sum) per canonical value."""
    _check_mask(mask, name)
    w = None if weights is None else weights.ravel()
    return np.bincount(mask.ravel(), weights=w, minlength=_N_CANONICAL)


def confusion_matrix(test: np.ndarray, label: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """4x4 pixel confusion matrix ``C[t, l]`` of canonical masks (one bincount pass).

    With ``weights`` (an image of the same shape, e.g. HU), each cell holds the sum of the
    weights of its pixels instead of their count (float64).
    """
    if test.shape != label.shape:
        raise ValueError(f"test mask shape {test.shape} differs from label mask shape {label.shape}")
    _check_mask(test, "test")
    _check_mask(label, "label")
    # Values are 0..3 so test*4+label is 0..15 and fits in uint8 without overflow.
    code = test.astype(np.uint8, copy=False) * np.uint8(_N_CANONICAL) + label.astype(np.uint8, copy=False)
    w = None
    if weights is not None:
        if weights.shape != test.shape:
            raise ValueError(f"weight image shape {weights.shape} differs from mask shape {test.shape}")
        w = weights.astype(np.float64, copy=False).ravel()
    counts = np.bincount(code.ravel(), weights=w, minlength=_N_CANONICAL * _N_CANONICAL)
    return counts.reshape(_N_CANONICAL, _N_CANONICAL)


def overlap_from_confusion(matrix: np.ndarray) -> OverlapCounts:
    """Per-class and ``msv`` overlap counts from a 4x4 confusion matrix ``C[t, l]``."""
    classes: dict[str, ClassOverlap] = {}
    for value, name in enumerate(TISSUES, start=1):
        inter = int(matrix[value, value])
        test_px = int(matrix[value, :].sum())
        label_px = int(matrix[:, value].sum())
        classes[name] = ClassOverlap(inter, test_px + label_px - inter, test_px, label_px)
    tissues = [classes[name] for name in TISSUES]
    classes["msv"] = ClassOverlap(
        intersection=sum(c.intersection for c in tissues),
        union=sum(c.union for c in tissues),
        test_px=sum(c.test_px for c in tissues),
        label_px=sum(c.label_px for c in tissues),
    )
    return OverlapCounts(classes)


def overlap_counts(test: np.ndarray, label: np.ndarray) -> OverlapCounts:
    """Intersection, union and pixel counts per tissue and for ``msv`` (one bincount pass)."""
    return overlap_from_confusion(confusion_matrix(test, label))


def iou_dice_per_class(test: np.ndarray, label: np.ndarray) -> dict[str, tuple[float | None, float | None]]:
    """``{metric class: (IoU, Dice)}``; both None where the class is empty in both masks."""
    counts = overlap_counts(test, label)
    return {name: (counts[name].iou, counts[name].dice) for name in METRIC_CLASSES}


def bin_name(iou: float | Fraction) -> str:
    """The seed's IoU bin (``protocols.classes.IOU_BINS``) holding ``iou``.

    Bins are closed below: 0.9 -> ``[0.9,1.0]``, 0.8999 -> ``[0.8,0.9)``, 0.7 -> ``[0.7,0.8)``.
    Pass ``ClassOverlap.iou_exact`` (a Fraction) to bin exactly from I / U; a float is compared
    with the nearest doubles of 0.9 / 0.8 / 0.7 (I / U computed in floating point is correctly
    rounded, so an exact ratio 9/10 still lands in ``[0.9,1.0]``).
    """
    if isinstance(iou, Fraction):
        if not 0 <= iou <= 1:
            raise ValueError(f"IoU must be within [0, 1], got {iou}")
        for name, exact in zip(IOU_BINS, _BIN_EDGES_EXACT, strict=True):
            if iou >= exact:
                return name
    else:
        value = float(iou)
        if math.isnan(value) or not 0.0 <= value <= 1.0:
            raise ValueError(f"IoU must be within [0, 1], got {iou!r}")
        for name, lower in zip(IOU_BINS, _BIN_EDGES_FLOAT, strict=True):
            if value >= lower:
                return name
    raise AssertionError("unreachable: the last bin starts at 0")  # pragma: no cover


def bin_counts(ious: Iterable[float | Fraction | None]) -> tuple[dict[str, int], int]:
    """Slice counts per seed bin (every bin present, in ``IOU_BINS`` order) and the undefined count."""
    counts = dict.fromkeys(IOU_BINS, 0)
    undefined = 0
    for iou in ious:
        if iou is None:
            undefined += 1
        else:
            counts[bin_name(iou)] += 1
    return counts, undefined


def pixel_area_cm2(spacing_mm: tuple[float, float]) -> float:
    """Area of one pixel in cm^2 from (row, column) spacing in mm."""
    row, col = float(spacing_mm[0]), float(spacing_mm[1])
    if not (row > 0 and col > 0 and math.isfinite(row) and math.isfinite(col)):
        raise ValueError(f"pixel spacing must be two positive finite mm values, got {spacing_mm!r}")
    return row * col / 100.0


def tissue_areas_cm2(mask: np.ndarray, spacing_mm: tuple[float, float]) -> dict[str, float]:
    """Area (cm^2) of each tissue in a canonical mask; anisotropic spacing is (row, col) mm."""
    px = pixel_area_cm2(spacing_mm)
    counts = _canonical_bincount(mask, "tissue")
    return {name: float(counts[value]) * px for value, name in enumerate(TISSUES, start=1)}


def mean_hu(mask: np.ndarray, hu: np.ndarray) -> dict[str, float | None]:
    """Mean HU of each tissue's pixels; None for a tissue absent from the mask."""
    if hu.shape != mask.shape:
        raise ValueError(f"HU image shape {hu.shape} differs from mask shape {mask.shape}")
    counts = _canonical_bincount(mask, "tissue")
    sums = _canonical_bincount(mask, "tissue", weights=hu.astype(np.float64, copy=False))
    return {
        name: (float(sums[value] / counts[value]) if counts[value] else None)
        for value, name in enumerate(TISSUES, start=1)
    }


def smi(muscle_cm2: float, height_m: float) -> float:
    """L3 skeletal muscle index, cm^2/m^2: muscle area divided by height squared."""
    if not (height_m > 0 and math.isfinite(height_m)):
        raise ValueError(f"height must be a positive number of metres, got {height_m!r}")
    if muscle_cm2 < 0:
        raise ValueError(f"muscle area must be >= 0 cm^2, got {muscle_cm2!r}")
    return muscle_cm2 / (height_m * height_m)


def summarise(values: Iterable[float]) -> Distribution:
    """n, mean, sd (ddof=1), median and quartiles of per-slice values.

    Quartiles use numpy's default ``linear`` method (type 7 of Hyndman & Fan, as R's default).
    ``sd`` is None when n < 2; everything but ``n`` is None when n = 0. Undefined values must
    be removed by the caller (and counted): None or NaN here is an error.
    """
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"summarise expects a flat sequence of numbers, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("summarise got NaN or infinite values; drop undefined values and count them apart")
    n = int(arr.size)
    if n == 0:
        return Distribution(n=0)
    q1, median, q3 = np.quantile(arr, [0.25, 0.5, 0.75], method="linear")
    return Distribution(
        n=n,
        mean=float(arr.mean()),
        sd=float(arr.std(ddof=1)) if n >= 2 else None,
        median=float(median),
        q1=float(q1),
        q3=float(q3),
    )


def iou_from_dice(dice: float) -> float:
    """IoU = Dice / (2 - Dice) (the seed's IoU >= 0.9 is Dice >= 0.947)."""
    if not 0.0 <= dice <= 1.0:
        raise ValueError(f"Dice must be within [0, 1], got {dice!r}")
    return dice / (2.0 - dice)


def dice_from_iou(iou: float) -> float:
    """Dice = 2 IoU / (1 + IoU), the inverse of :func:`iou_from_dice`."""
    if not 0.0 <= iou <= 1.0:
        raise ValueError(f"IoU must be within [0, 1], got {iou!r}")
    return 2.0 * iou / (1.0 + iou)


def total_overlap(counts: Iterable[ClassOverlap]) -> ClassOverlap:
    """Pixel counts summed over slices (pooled over pixels)."""
    inter = union = test_px = label_px = 0
    for c in counts:
        inter += c.intersection
        union += c.union
        test_px += c.test_px
        label_px += c.label_px
    return ClassOverlap(inter, union, test_px, label_px)
