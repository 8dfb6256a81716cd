"""Per-slice discrepancy analysis: where, how and with what density two masks disagree.

``analyse_slice(hu, spacing_mm, site, ref)`` compares a site's mask with a reference mask
(the model's prediction, or the manifest's ``reference`` mask), class by class:

- ``site_excludes``: the reference says the class, the site does not;
  ``site_includes``: the site says the class, the reference does not;
- ``intramuscular_fat`` (muscle only): discordant pixels of fat density (the fat HU
  range) inside the other mask's muscle (its small holes and gaps of up to ~4 px), and
  region-level pieces mostly of fat density, such as fat between the back muscles;
- ``boundary``: a connected piece of disagreement that never reaches deeper than
  ``band_px`` pixels from the reference class's contour (for ``site_excludes``: inside
  it; for ``site_includes``: outside it). Contours drawn 2 px tight are all boundary;
- otherwise the piece is region-level and, for muscle, named by the body frame
  (``psoas``, ``paraspinal``, ``abdominal_wall``, ``other``; majority of its pixels).
  Fat classes have no anatomical regions: their region-level pieces are ``other``.

For every (class, direction, region) it keeps the area and the pixel counts whose HU lies
in the class's range and in the fat range, and a polar map of all discordant area.
Nothing here leaves the site: :mod:`common.discrepancy.findings` turns many slices into
aggregates.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from scipy import ndimage

from common.discrepancy.frame import REGION_NAMES, BodyFrame, body_frame, fill_small_holes
from common.discrepancy.polar import N_ANGLE, N_RADIUS, add_to_polar, empty_polar
from protocols.classes import TISSUES
from protocols.findings import DIRECTIONS
from protocols.protocol import HuRanges

log = logging.getLogger(__name__)

#: Default half-width of the contour band, in pixels (readers draw contours in pixels).
BAND_PX = 3
#: Holes up to this area (mm^2) are inside a structure (IMAT islands), not part of its contour.
SMALL_HOLE_MM2 = 100.0
_CROSS = ndimage.generate_binary_structure(2, 1)
_SQUARE = np.ones((3, 3), dtype=bool)


class Key(NamedTuple):
    """One kind of disagreement: class, direction, region (the words of a Finding)."""

    tissue: str
    direction: str
    region: str

    def text(self) -> str:
        return f"{self.tissue}:{self.direction}:{self.region}"


@dataclass(frozen=True)
class RegionStat:
    """Discordant pixels of one kind on one slice."""

    area_cm2: float
    n_px: int
    n_class_density: int  # HU within the class's range
    n_fat_density: int  # HU within the fat (SAT / IMAT) range


@dataclass(frozen=True, eq=False)
class SliceDiscrepancy:
    """Everything the site aggregates about one slice (never sent as such).

    ``class_area_cm2`` is the reference's area per tissue (the denominator of area shares);
    ``perimeter_px`` the reference contour length in pixels, small holes not counted (to
    turn a boundary band into a thickness); ``stats`` the discordant pixels by
    :class:`Key`; ``polar`` the discordant area, shape (tissue, direction, angle, radius)
    in the order of ``TISSUES`` and ``DIRECTIONS``. ``spine_found`` is None when the masks
    agree (no frame was needed), False when the regions were named without a spine.
    """

    spacing_mm: tuple[float, float]
    class_area_cm2: dict[str, float]
    perimeter_px: dict[str, int]
    stats: dict[Key, RegionStat]
    polar: np.ndarray
    spine_found: bool | None
    band_px: int = BAND_PX
    frame: BodyFrame | None = field(default=None, repr=False)

    def area(self, tissue: str, direction: str, region: str) -> float:
        stat = self.stats.get(Key(tissue, direction, region))
        return stat.area_cm2 if stat else 0.0


def _check(hu: np.ndarray, site: np.ndarray, ref: np.ndarray, spacing_mm: tuple[float, float]) -> None:
    if hu.ndim != 2 or site.shape != hu.shape or ref.shape != hu.shape:
        raise ValueError(
            f"hu, site and ref must be 2-D of one shape, got {hu.shape}, {site.shape}, {ref.shape}"
        )
    for name, mask in (("site", site), ("ref", ref)):
        top = int(mask.max()) if mask.size else 0
        if int(mask.min()) < 0 or top > len(TISSUES):
            raise ValueError(f"{name} mask must hold canonical classes 0-3, found value {top}")
    if len(spacing_mm) != 2 or min(spacing_mm) <= 0:
        raise ValueError(f"spacing_mm must be two positive numbers (row, col), got {spacing_mm}")


def _box(mask: np.ndarray, margin: int) -> tuple[slice, slice]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return (
        slice(max(int(rows[0]) - margin, 0), int(rows[-1]) + margin + 1),
        slice(max(int(cols[0]) - margin, 0), int(cols[-1]) + margin + 1),
    )


def _imat(discordant: np.ndarray, other: np.ndarray, fat: np.ndarray, small_hole_px: int) -> np.ndarray:
    """Fat-density discordant pixels inside ``other``: in its small holes or narrow gaps."""
    if not discordant.any():
        return np.zeros_like(discordant)
    closed = ndimage.binary_closing(other, _SQUARE, iterations=2)
    inside = fill_small_holes(other | closed, small_hole_px)
    return discordant & fat & inside


class _Collector:
    def __init__(self, hu: np.ndarray, ranges: HuRanges, px_cm2: float) -> None:
        self.hu = hu
        self.ranges = ranges
        self.px_cm2 = px_cm2
        self.stats: dict[Key, RegionStat] = {}

    def add(self, key: Key, rows: np.ndarray, cols: np.ndarray) -> None:
        if rows.size == 0:
            return
        values = self.hu[rows, cols]
        lo, hi = getattr(self.ranges, key.tissue)
        flo, fhi = self.ranges.subcutaneous_fat
        old = self.stats.get(key)
        n = int(rows.size)
        stat = RegionStat(
            area_cm2=n * self.px_cm2,
            n_px=n,
            n_class_density=int(np.count_nonzero((values >= lo) & (values <= hi))),
            n_fat_density=int(np.count_nonzero((values >= flo) & (values <= fhi))),
        )
        if old is not None:
            stat = RegionStat(
                old.area_cm2 + stat.area_cm2,
                old.n_px + stat.n_px,
                old.n_class_density + stat.n_class_density,
                old.n_fat_density + stat.n_fat_density,
            )
        self.stats[key] = stat


def _split(discordant: np.ndarray, deep: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(boundary mask, region mask, component label of each region pixel) of a discordant mask."""
    labels, n = ndimage.label(discordant, structure=_SQUARE)
    reaches = np.zeros(n + 1, dtype=bool)
    reaches[np.unique(labels[discordant & deep])] = True
    reaches[0] = False
    region = reaches[labels]
    return discordant & ~region, region, labels


def _is_fat(values: np.ndarray, ranges: HuRanges) -> np.ndarray:
    return (values >= ranges.subcutaneous_fat[0]) & (values <= ranges.subcutaneous_fat[1])


#: Region code of muscle pieces that are mostly fat (intermuscular / intramuscular fat).
IMAT_CODE = len(REGION_NAMES)
REGION_WORDS: tuple[str, ...] = (*REGION_NAMES, "intramuscular_fat")


def _name_components(
    frame: BodyFrame | None,
    rows: np.ndarray,
    cols: np.ndarray,
    components: np.ndarray,
    fat: np.ndarray,
) -> np.ndarray:
    """Region code per pixel (index into REGION_WORDS), decided per connected component.

    A muscle piece made mostly of fat-density pixels is intramuscular fat (e.g. fat between
    the back muscles); otherwise the majority of its pixels' frame regions names it.
    """
    n_regions = len(REGION_NAMES)
    _, comp = np.unique(components, return_inverse=True)
    n_comp = int(comp.max()) + 1
    if frame is None:
        winner = np.full(n_comp, REGION_NAMES.index("other"), dtype=np.int64)
    else:
        codes = frame.regions(rows, cols).astype(np.int64)
        votes = np.bincount(comp * n_regions + codes, minlength=n_comp * n_regions)
        winner = votes.reshape(-1, n_regions).argmax(axis=1)
    fat_share = np.bincount(comp, weights=fat, minlength=n_comp) / np.bincount(comp, minlength=n_comp)
    winner[fat_share > 0.5] = IMAT_CODE
    return winner[comp]


def analyse_slice(
    hu: np.ndarray,
    spacing_mm: tuple[float, float],
    site: np.ndarray,
    ref: np.ndarray,
    *,
    hu_ranges: HuRanges | None = None,
    band_px: int = BAND_PX,
    n_angle: int = N_ANGLE,
    n_radius: int = N_RADIUS,
) -> SliceDiscrepancy:
    """Compare the site's mask with the reference mask on one slice (see module docstring).

    ``hu`` float HxW in Hounsfield units; ``spacing_mm`` (row, col); ``site`` and ``ref``
    canonical uint8 masks (0 background, 1 muscle, 2 subcutaneous fat, 3 visceral fat).
    """
    _check(hu, site, ref, spacing_mm)
    if band_px < 1:
        raise ValueError(f"band_px must be >= 1, got {band_px}")
    ranges = hu_ranges or HuRanges()
    spacing = (float(spacing_mm[0]), float(spacing_mm[1]))
    px_cm2 = spacing[0] * spacing[1] / 100.0
    polar = empty_polar(n_angle, n_radius)
    class_area: dict[str, float] = {}
    perimeter: dict[str, int] = {}

    disagree = site != ref
    frame: BodyFrame | None = None
    spine_found: bool | None = None
    if disagree.any():
        try:
            frame = body_frame(hu, spacing)
            spine_found = frame.spine_found
        except ValueError as exc:
            log.warning("no body frame for this slice (%s); discrepancies are named 'other'", exc)
            spine_found = False
    collector = _Collector(hu, ranges, px_cm2)
    margin = band_px + 4
    small_hole_px = max(int(SMALL_HOLE_MM2 / (spacing[0] * spacing[1])), 1)

    for t_index, tissue in enumerate(TISSUES):
        value = t_index + 1
        r = ref == value
        s = site == value
        n_ref = int(np.count_nonzero(r))
        class_area[tissue] = n_ref * px_cm2
        if n_ref == 0 and not s.any():
            perimeter[tissue] = 0
            continue
        box = _box(r | s, margin)
        rb, sb = r[box], s[box]
        inner = ndimage.binary_erosion(rb, _CROSS)
        solid = fill_small_holes(rb, small_hole_px)
        perimeter[tissue] = int(np.count_nonzero(solid & ~ndimage.binary_erosion(solid, _CROSS)))
        excl, incl = rb & ~sb, sb & ~rb
        if not (excl.any() or incl.any()):
            continue
        r0, c0 = box[0].start, box[1].start
        if tissue == "muscle":
            # fat-density pixels inside the other mask's muscle (a notch of a wobbly contour has
            # muscle density and stays boundary)
            fat = _is_fat(hu[box], ranges)
            imat_in = _imat(incl, rb, fat, small_hole_px)
            imat_ex = _imat(excl, sb, fat, small_hole_px)
            for direction, imat in (("site_includes", imat_in), ("site_excludes", imat_ex)):
                rows, cols = np.nonzero(imat)
                collector.add(Key(tissue, direction, "intramuscular_fat"), rows + r0, cols + c0)
            incl &= ~imat_in
            excl &= ~imat_ex
        deep = {
            "site_excludes": ndimage.binary_erosion(inner, _CROSS, iterations=band_px - 1)
            if band_px > 1
            else inner,
            "site_includes": ~ndimage.binary_dilation(rb, _CROSS, iterations=band_px),
        }
        for direction, mask in (("site_excludes", excl), ("site_includes", incl)):
            if not mask.any():
                continue
            boundary, region, labels = _split(mask, deep[direction])
            rows, cols = np.nonzero(boundary)
            collector.add(Key(tissue, direction, "boundary"), rows + r0, cols + c0)
            rows, cols = np.nonzero(region)
            if rows.size:
                rows, cols = rows + r0, cols + c0
                if tissue == "muscle":
                    codes = _name_components(
                        frame, rows, cols, labels[region], _is_fat(hu[rows, cols], ranges)
                    )
                else:
                    codes = np.full(rows.shape, REGION_NAMES.index("other"), dtype=np.int64)
                for code in np.unique(codes):
                    pick = codes == code
                    collector.add(Key(tissue, direction, REGION_WORDS[code]), rows[pick], cols[pick])
        if frame is not None:
            for d_index, direction in enumerate(DIRECTIONS):
                source = ref if direction == "site_excludes" else site
                other = site if direction == "site_excludes" else ref
                rows, cols = np.nonzero((source[box] == value) & (other[box] != value))
                add_to_polar(polar, frame, rows + r0, cols + c0, t_index, d_index, px_cm2)

    return SliceDiscrepancy(
        spacing_mm=spacing,
        class_area_cm2=class_area,
        perimeter_px=perimeter,
        stats=collector.stats,
        polar=polar,
        spine_found=spine_found,
        band_px=band_px,
        frame=frame,
    )


__all__ = ["BAND_PX", "Key", "RegionStat", "SliceDiscrepancy", "analyse_slice"]
