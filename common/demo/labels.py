"""Label conventions: how a reader turns the phantom's structures into a mask.

A :class:`LabelConvention` says which muscles a centre counts, whether intramuscular fat
(IMAT) counts as muscle, how tightly contours are drawn and which HU ranges are applied.
:data:`REFERENCE` follows the Alberta protocol (PRODUCT.md): every muscle at L3, IMAT
excluded, muscle -29..150 HU, subcutaneous fat -190..-30 HU, visceral fat -150..-50 HU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from common.demo.structures import MUSCLE_STRUCTURES, Structure
from protocols.classes import Tissue

HURange = tuple[float, float]


@dataclass(frozen=True)
class LabelConvention:
    """How one centre labels L3 slices."""

    name: str = "reference"
    include_psoas: bool = True
    include_paraspinal: bool = True
    include_quadratus: bool = True
    imat_as_muscle: bool = False  # intramuscular fat counted as muscle (no muscle threshold)
    contour_erosion_px: int = 0  # muscle contours drawn this many pixels inside the edge
    muscle_hu_range: HURange | None = (-29.0, 150.0)
    sat_hu_range: HURange | None = (-190.0, -30.0)
    vat_hu_range: HURange | None = (-150.0, -50.0)

    def __post_init__(self) -> None:
        if self.contour_erosion_px < 0:
            raise ValueError(f"contour_erosion_px must be >= 0, got {self.contour_erosion_px}")
        for field in ("muscle_hu_range", "sat_hu_range", "vat_hu_range"):
            rng = getattr(self, field)
            if rng is not None and not rng[0] < rng[1]:
                raise ValueError(f"{field} must be (low, high) with low < high, got {rng}")

    @property
    def muscles(self) -> tuple[Structure, ...]:
        """The muscle structures this convention labels as muscle."""
        keep = {
            Structure.abdominal_wall_muscle: True,
            Structure.psoas: self.include_psoas,
            Structure.paraspinal: self.include_paraspinal,
            Structure.quadratus_lumborum: self.include_quadratus,
        }
        return tuple(s for s in MUSCLE_STRUCTURES if keep[s])

    @property
    def uses_hu(self) -> bool:
        return any(r is not None for r in (self.muscle_hu_range, self.sat_hu_range, self.vat_hu_range))

    def describe(self) -> str:
        """The convention in plain words, for site.toml descriptions and CLI output."""
        left_out = [
            name
            for name, kept in (
                ("psoas", self.include_psoas),
                ("paraspinal muscles", self.include_paraspinal),
                ("quadratus lumborum", self.include_quadratus),
            )
            if not kept
        ]
        muscles = (
            "labels every muscle at L3" if not left_out else "labels muscle without " + " and ".join(left_out)
        )
        imat = "intramuscular fat included in muscle" if self.imat_as_muscle else "intramuscular fat left out"
        parts = [muscles, imat]
        if self.contour_erosion_px:
            parts.append(f"muscle contours drawn {self.contour_erosion_px} px tight")

        def show(r: HURange | None) -> str:
            return "no threshold" if r is None else f"{r[0]:g}..{r[1]:g} HU"

        parts.append(
            f"muscle {show(self.muscle_hu_range)}, subcutaneous fat {show(self.sat_hu_range)}, "
            f"visceral fat {show(self.vat_hu_range)}"
        )
        return "; ".join(parts)


#: The Alberta-protocol reference convention (all muscles, IMAT excluded, HU ranges).
REFERENCE = LabelConvention()


def _in_range(hu: np.ndarray | None, rng: HURange | None, what: str) -> np.ndarray | bool:
    if rng is None:
        return True
    if hu is None:
        raise ValueError(f"the convention thresholds {what} at {rng} HU: pass the slice's HU image as hu=")
    return (hu >= rng[0]) & (hu <= rng[1])


def _imat_of_included(structures: np.ndarray, convention: LabelConvention) -> np.ndarray:
    """Intramuscular-fat pixels whose nearest muscle is one the convention counts."""
    imat = structures == Structure.intramuscular_fat
    if not imat.any():
        return imat
    muscle_any = np.isin(structures, MUSCLE_STRUCTURES)
    if not muscle_any.any():
        return np.zeros_like(imat)
    if len(convention.muscles) == len(MUSCLE_STRUCTURES):
        return imat
    idx = ndimage.distance_transform_edt(~muscle_any, return_distances=False, return_indices=True)
    parent = structures[idx[0], idx[1]]
    return imat & np.isin(parent, convention.muscles)


def _check_inputs(structures: np.ndarray, hu: np.ndarray | None) -> None:
    if structures.ndim != 2:
        raise ValueError(f"structures must be a 2-D map, got shape {structures.shape}")
    if hu is not None and hu.shape != structures.shape:
        raise ValueError(f"hu shape {hu.shape} differs from structures shape {structures.shape}")


def imat_mask(
    structures: np.ndarray, convention: LabelConvention, hu: np.ndarray | None = None
) -> np.ndarray:
    """Pixels such a reader would mark as IMAT (fat inside counted muscles, not muscle).

    Empty when the convention counts IMAT as muscle. With a muscle HU range, muscle pixels
    that fall in the fat range (-190 up to the muscle range) are IMAT as well, as in
    Slice-O-Matic.
    """
    _check_inputs(structures, hu)
    if convention.imat_as_muscle:
        return np.zeros(structures.shape, dtype=bool)
    out = _imat_of_included(structures, convention)
    if convention.muscle_hu_range is not None and hu is not None:
        fatty = np.isin(structures, convention.muscles) & (hu >= -190) & (hu < convention.muscle_hu_range[0])
        out = out | fatty
    return out


def canonical_labels(
    structures: np.ndarray, convention: LabelConvention = REFERENCE, hu: np.ndarray | None = None
) -> np.ndarray:
    """A reader's mask in canonical classes (0 bg, 1 muscle, 2 SAT, 3 VAT), uint8.

    ``hu`` (the image the reader sees, after scanner effects) is needed when the convention
    applies HU ranges; a pixel outside its class's range becomes background.
    """
    _check_inputs(structures, hu)
    muscle = np.isin(structures, convention.muscles) & _in_range(hu, convention.muscle_hu_range, "muscle")
    if convention.imat_as_muscle:
        muscle |= _imat_of_included(structures, convention)
    if convention.contour_erosion_px:
        # the outline is drawn inside the edge; holes (IMAT cut out by thresholds) stay as they are
        outline = ndimage.binary_fill_holes(muscle)
        muscle &= ndimage.binary_erosion(outline, iterations=convention.contour_erosion_px)
    sat = (structures == Structure.subcutaneous_fat) & _in_range(
        hu, convention.sat_hu_range, "subcutaneous fat"
    )
    vat = (structures == Structure.visceral_fat) & _in_range(hu, convention.vat_hu_range, "visceral fat")
    out = np.zeros(structures.shape, dtype=np.uint8)
    out[vat] = Tissue.visceral_fat
    out[sat] = Tissue.subcutaneous_fat
    out[muscle] = Tissue.muscle
    return out


__all__ = ["REFERENCE", "HURange", "LabelConvention", "canonical_labels", "imat_mask"]
