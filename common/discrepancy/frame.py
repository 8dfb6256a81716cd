"""A body-relative frame built from the CT image alone (no anatomy labels).

The frame answers two questions about any pixel: where is it around the body (angle and
radius normalised by the body outline, for polar maps), and which muscle region is it in
(``psoas``, ``paraspinal``, ``abdominal_wall`` or ``other``, for naming findings).

How it is built, all in millimetres (pixel spacing may differ per axis):

1. body: HU > -500, largest connected component, holes filled (the CT couch and air are
   separate components and drop out);
2. spine: dense components (HU > 200) inside the body, holes filled (an osteoporotic
   vertebral body is a cortical ring around low-density bone). The chosen one is the
   largest that holds cortical-density bone (> 450 HU) and lies within the inner part of
   the body; contrast-filled bowel or a rib rarely passes both tests;
3. anterior: from the vertebral body towards the body centroid (patients usually lie
   supine, so this is image-up, but it is derived, so rotated, off-centre or prone
   images work); the spine's own axis (vertebral body ahead of the posterior arch) when
   the spine sits at the centroid;
4. vertebral body: the thickest point of the spine (grown into trabecular bone, canal
   left open) is its centre, that thickness its half-depth, and the spine's lateral
   extent through it its half-width; these set the scale of the region rules.

When no spine is found the frame falls back to image-up as anterior and puts the spine
halfway between the body centroid and the back (``spine_found`` is False).

Region rules, relative to the vertebral-body centre (``w`` = its half-width, ``h`` = its
half-depth, angles measured from the posterior axis):

- ``paraspinal``: behind the vertebral body (more than ``1.1 h`` posterior of its
  centre), within 60 degrees of the posterior axis, within ``5 w`` of its centre and
  ``3 w`` of the midline;
- ``psoas``: not that far back, more than 30 degrees from the anterior axis (beside the
  vertebral body, not in front of it where the aorta lies), within ``3.5 w``, and not in
  the outer 40% of the body radius;
- ``abdominal_wall``: anything else in the outer 40% of the body radius;
- ``other``: the rest (e.g. deep in the abdominal cavity). Quadratus lumborum, lateral to
  the paraspinals, usually ends up ``other`` or ``abdominal_wall``: there is no region
  word for it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

log = logging.getLogger(__name__)

BODY_HU = -500.0
BONE_HU = 200.0
CORTICAL_HU = 450.0
#: Smoothed HU above which tissue next to the spine counts as trabecular bone.
TRABECULAR_HU = 100.0
#: Posterior elements are dense cortical bone (a contrast-filled aorta is not).
ARCH_HU = 350.0
#: A solid vertebral body is at least this thick (half-depth, mm); thinner means its ring is open.
MIN_VB_DEPTH_MM = 8.0
#: Holes up to this area (mm^2) inside bone are noise; the spinal canal is larger.
SMALL_HOLE_MM2 = 60.0
#: A spine candidate needs at least this much cortical-density bone (mm^2).
MIN_CORTICAL_MM2 = 20.0
#: ... and at least this filled area (mm^2); an adult L3 vertebral body is > 800 mm^2.
MIN_SPINE_MM2 = 150.0
#: Number of angle bins of the outline radius table (1 degree each).
OUTLINE_BINS = 360

#: Region codes used inside this package (index into REGION_NAMES).
PSOAS, PARASPINAL, ABDOMINAL_WALL, OTHER = 0, 1, 2, 3
REGION_NAMES: tuple[str, ...] = ("psoas", "paraspinal", "abdominal_wall", "other")

PARASPINAL_MAX_ANGLE = 60.0  # degrees from the posterior axis
PARASPINAL_MAX_LATERAL = 3.0  # x vertebral-body half-width from the midline
PARASPINAL_MAX_DIST = 5.0  # x vertebral-body half-width
PSOAS_MIN_ANGLE_FROM_ANTERIOR = 30.0
PSOAS_MAX_DIST = 3.5  # x vertebral-body half-width
POSTERIOR_SPLIT = 1.1  # x vertebral-body half-depth behind its centre
WALL_MIN_RADIUS = 0.6  # normalised body radius


@dataclass(frozen=True, eq=False)
class BodyFrame:
    """Body-relative coordinates of one slice. Points are (row, col) in millimetres.

    ``anterior`` is a unit vector (row, col); ``lateral`` is ``anterior`` turned so that it
    points to image-right when anterior is image-up. ``outline_mm[k]`` is the distance from
    ``centre`` to the body outline at angle ``k`` degrees (see :meth:`polar`).
    """

    spacing_mm: tuple[float, float]
    shape: tuple[int, int]
    body: np.ndarray  # bool HxW
    centre: tuple[float, float]
    spine: tuple[float, float]  # vertebral-body centre
    anterior: tuple[float, float]
    vb_half_width_mm: float
    vb_half_depth_mm: float
    spine_found: bool
    outline_mm: np.ndarray  # float (OUTLINE_BINS,)
    #: the bone component chosen as the spine (holes filled), bool HxW; None when none was found
    spine_mask: np.ndarray | None = None

    @property
    def lateral(self) -> tuple[float, float]:
        ar, ac = self.anterior
        return (ac, -ar)

    def _axes(
        self, rows: np.ndarray, cols: np.ndarray, origin: tuple[float, float]
    ) -> tuple[np.ndarray, np.ndarray]:
        """(anterior, lateral) mm coordinates of pixels relative to ``origin``."""
        dr = rows * self.spacing_mm[0] - origin[0]
        dc = cols * self.spacing_mm[1] - origin[1]
        ar, ac = self.anterior
        lr, lc = self.lateral
        return dr * ar + dc * ac, dr * lr + dc * lc

    def polar(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Angle (degrees, 0 anterior, 90 image-right when anterior is up) and radius / outline.

        Both about the body centroid; the normalised radius is clipped to [0, 1].
        """
        ap, lat = self._axes(rows, cols, self.centre)
        angle = np.degrees(np.arctan2(lat, ap)) % 360.0
        k = np.minimum((angle * OUTLINE_BINS / 360.0).astype(np.int64), OUTLINE_BINS - 1)
        radius = np.hypot(ap, lat) / np.maximum(self.outline_mm[k], 1e-6)
        return angle, np.clip(radius, 0.0, 1.0)

    def regions(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Region code (PSOAS, PARASPINAL, ABDOMINAL_WALL, OTHER) of each pixel, int8."""
        ap, lat = self._axes(rows, cols, self.spine)
        dist = np.hypot(ap, lat)
        from_posterior = np.degrees(np.arctan2(np.abs(lat), -ap))  # 0 straight back, 180 straight ahead
        w, h = self.vb_half_width_mm, self.vb_half_depth_mm
        behind = ap < -POSTERIOR_SPLIT * h
        paraspinal = (
            behind
            & (from_posterior <= PARASPINAL_MAX_ANGLE)
            & (dist <= PARASPINAL_MAX_DIST * w)
            & (np.abs(lat) <= PARASPINAL_MAX_LATERAL * w)
        )
        psoas = (
            ~behind & (from_posterior <= 180.0 - PSOAS_MIN_ANGLE_FROM_ANTERIOR) & (dist <= PSOAS_MAX_DIST * w)
        )
        _, radius = self.polar(rows, cols)
        outer = radius >= WALL_MIN_RADIUS
        out = np.full(rows.shape, OTHER, dtype=np.int8)
        out[outer] = ABDOMINAL_WALL
        out[psoas & ~outer] = PSOAS
        out[paraspinal] = PARASPINAL
        return out


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill holes by labelling the background once (faster than iterative propagation)."""
    labels, n = ndimage.label(~mask)
    if n == 0:
        return mask.copy()
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    inner = np.ones(n + 1, dtype=bool)
    inner[edge] = False
    inner[0] = False
    return mask | inner[labels]


def fill_small_holes(mask: np.ndarray, max_px: int) -> np.ndarray:
    """The mask with holes of at most ``max_px`` pixels filled."""
    holes = fill_holes(mask) & ~mask
    labels, n = ndimage.label(holes)
    if n == 0:
        return mask
    small = np.bincount(labels.ravel()) <= max_px
    small[0] = False
    return mask | small[labels]


def largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask.copy()
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def _unit(vr: float, vc: float) -> tuple[float, float] | None:
    norm = math.hypot(vr, vc)
    return None if norm < 1e-9 else (vr / norm, vc / norm)


def _outline_radii(
    body: np.ndarray, centre: tuple[float, float], spacing: tuple[float, float], anterior: tuple[float, float]
) -> np.ndarray:
    edge = body & ~ndimage.binary_erosion(body)
    rows, cols = np.nonzero(edge)
    dr, dc = rows * spacing[0] - centre[0], cols * spacing[1] - centre[1]
    ar, ac = anterior
    ap, lat = dr * ar + dc * ac, dr * ac - dc * ar
    angle = np.degrees(np.arctan2(lat, ap)) % 360.0
    k = np.minimum((angle * OUTLINE_BINS / 360.0).astype(np.int64), OUTLINE_BINS - 1)
    radii = np.zeros(OUTLINE_BINS)
    np.maximum.at(radii, k, np.hypot(ap, lat))
    have = radii > 0
    if not have.any():
        return np.ones(OUTLINE_BINS)
    if not have.all():
        x = np.arange(OUTLINE_BINS)
        radii = np.interp(x, x[have], radii[have], period=OUTLINE_BINS)
    # half a pixel: the outline pixel's centre lies inside the body surface
    return radii + 0.5 * min(spacing)


def _spine_component(
    hu: np.ndarray,
    body: np.ndarray,
    spacing: tuple[float, float],
    centre: tuple[float, float],
    body_radius: float,
) -> np.ndarray | None:
    px_mm2 = spacing[0] * spacing[1]
    bone = fill_holes((hu > BONE_HU) & body)
    labels, n = ndimage.label(bone)
    if n == 0:
        return None
    index = np.arange(1, n + 1)
    rows, cols = np.nonzero(bone)
    lab = labels[rows, cols]
    count = np.bincount(lab, minlength=n + 1)[1:]
    area = count * px_mm2
    cortical = np.bincount(lab, weights=hu[rows, cols] > CORTICAL_HU, minlength=n + 1)[1:] * px_mm2
    com_r = np.bincount(lab, weights=rows, minlength=n + 1)[1:] / count
    com_c = np.bincount(lab, weights=cols, minlength=n + 1)[1:] / count
    dist = np.hypot(com_r * spacing[0] - centre[0], com_c * spacing[1] - centre[1])
    score = (
        area
        * np.where(cortical >= MIN_CORTICAL_MM2, 1.0, 0.2)
        * np.where(dist <= 0.75 * body_radius, 1.0, 0.2)
    )
    score[area < MIN_SPINE_MM2] = 0.0
    if not score.any():
        return None
    return labels == int(index[np.argmax(score)])


def _crop(mask: np.ndarray, margin: int) -> tuple[slice, slice]:
    rows, cols = np.nonzero(mask)
    return (
        slice(max(int(rows.min()) - margin, 0), int(rows.max()) + margin + 1),
        slice(max(int(cols.min()) - margin, 0), int(cols.max()) + margin + 1),
    )


@dataclass(frozen=True, eq=False)
class _SpineParts:
    block: np.ndarray  # vertebral body (often with the filled canal)
    thin: np.ndarray  # posterior elements (processes)
    deepest: tuple[float, float]  # mm; centre of the largest inscribed disk: inside the vertebral body
    depth_mm: float  # its radius: about the vertebral body's half-depth


def _split_spine(hu: np.ndarray, spine: np.ndarray, spacing: tuple[float, float]) -> _SpineParts:
    """Vertebral body block and thin posterior elements of the spine component.

    A thin cortical ring around low-density trabecular bone may have gaps at coarse
    pixels: the spine is grown into smoothed bone above ``TRABECULAR_HU`` and small holes
    are filled (the canal stays open, so it never thickens the block; only when no solid
    vertebral body results are the ring's gaps closed and everything filled). The thickest
    point (largest inscribed disk) lies in the vertebral body: wider than the canal, the
    aorta or any process. An opening whose radius grows with that thickness keeps the
    block around it (a contrast-filled aorta touching the vertebral body is cut off) and
    drops the processes. Morphology by distance transforms, in mm.
    """
    margin = math.ceil(12.0 / min(spacing)) + 2
    box = _crop(spine, margin)
    seed = spine[box] & (hu[box] > BONE_HU)  # the canal, filled when the spine was chosen, is not bone
    trabecular = ndimage.gaussian_filter(hu[box], 1.0) > TRABECULAR_HU
    labels, _ = ndimage.label(trabecular | seed)
    keep = np.zeros(labels.max() + 1, dtype=bool)
    keep[np.unique(labels[seed])] = True
    keep[0] = False
    grown = keep[labels]
    # noise holes in trabecular bone are filled; the spinal canal (> 150 mm^2) stays open
    local = fill_small_holes(grown, int(SMALL_HOLE_MM2 / (spacing[0] * spacing[1])))
    depth = ndimage.distance_transform_edt(local, sampling=spacing)
    if depth.max() < MIN_VB_DEPTH_MM:
        # a cortical ring with gaps around very low-density bone: close the gaps and fill
        closed = ndimage.distance_transform_edt(_dilate_mm(grown, 4.0, spacing), sampling=spacing) > 4.0
        local = fill_holes(closed | grown)
        depth = ndimage.distance_transform_edt(local, sampling=spacing)
    deepest = np.unravel_index(int(np.argmax(depth)), depth.shape)
    centre = ((deepest[0] + box[0].start) * spacing[0], (deepest[1] + box[1].start) * spacing[1])
    radius = float(np.clip(0.55 * depth.max(), 4.0, 10.0))
    eroded = depth > radius
    block = np.zeros_like(spine)
    thin = np.zeros_like(spine)
    if not eroded.any():
        return _SpineParts(spine, thin, centre, float(depth.max()))
    labels, _ = ndimage.label(eroded)
    core = labels == labels[deepest]
    block[box] = _dilate_mm(core, radius, spacing) & local
    thin[box] = seed & ~_dilate_mm(eroded, radius, spacing) & (hu[box] > ARCH_HU)
    return _SpineParts(block, thin, centre, float(depth.max()))


def _dilate_mm(mask: np.ndarray, radius_mm: float, spacing: tuple[float, float]) -> np.ndarray:
    """Dilation by a disk of ``radius_mm`` (distance transform of the complement)."""
    return ndimage.distance_transform_edt(~mask, sampling=spacing) <= radius_mm


def _fallback_frame(
    hu: np.ndarray, body: np.ndarray, spacing: tuple[float, float], centre: tuple[float, float]
) -> BodyFrame:
    log.debug("no spine found; anterior assumed image-up")
    anterior = (-1.0, 0.0)
    outline = _outline_radii(body, centre, spacing, anterior)
    back = float(outline[OUTLINE_BINS // 2])
    return BodyFrame(
        spacing_mm=spacing,
        shape=(int(hu.shape[0]), int(hu.shape[1])),
        body=body,
        centre=centre,
        spine=(centre[0] + 0.5 * back, centre[1]),
        anterior=anterior,
        vb_half_width_mm=22.0,
        vb_half_depth_mm=16.0,
        spine_found=False,
        outline_mm=outline,
    )


def _centroid(mask: np.ndarray, spacing: tuple[float, float]) -> tuple[float, float]:
    rows, cols = np.nonzero(mask)
    return float(rows.mean() * spacing[0]), float(cols.mean() * spacing[1])


def _orientation(
    block_centre: tuple[float, float],
    thin: np.ndarray,
    centre: tuple[float, float],
    body_radius: float,
    spacing: tuple[float, float],
) -> tuple[float, float] | None:
    """Anterior: from the vertebral body towards the body centroid.

    When the spine sits almost at the centroid that direction is noise, and the spine's own
    axis (from its thin posterior processes through the thick block) is used instead.
    """
    offset = math.hypot(centre[0] - block_centre[0], centre[1] - block_centre[1])
    if offset >= 0.15 * body_radius:
        return _unit(centre[0] - block_centre[0], centre[1] - block_centre[1])
    if thin.sum() * spacing[0] * spacing[1] < 60.0:
        return None
    arch = _centroid(thin, spacing)
    return _unit(block_centre[0] - arch[0], block_centre[1] - arch[1])


def body_frame(hu: np.ndarray, spacing_mm: tuple[float, float]) -> BodyFrame:
    """Build the body-relative frame of one axial slice from its HU image.

    Raises ValueError when the image holds no body (nothing above -500 HU).
    """
    if hu.ndim != 2:
        raise ValueError(f"hu must be a 2-D slice, got shape {hu.shape}")
    spacing = (float(spacing_mm[0]), float(spacing_mm[1]))
    body = fill_holes(largest_component(hu > BODY_HU))
    n_body = int(body.sum())
    if n_body == 0:
        raise ValueError("the slice holds no body (no pixel above -500 HU): is it a CT in Hounsfield units?")
    centre = _centroid(body, spacing)
    body_radius = math.sqrt(n_body * spacing[0] * spacing[1] / math.pi)

    spine = _spine_component(hu, body, spacing, centre, body_radius)
    if spine is None:
        return _fallback_frame(hu, body, spacing, centre)
    parts = _split_spine(hu, spine, spacing)
    anterior = _orientation(_centroid(parts.block, spacing), parts.thin, centre, body_radius, spacing)
    if anterior is None:
        return _fallback_frame(hu, body, spacing, centre)

    # vertebral-body scale: the block's lateral extent in a slab through its thickest point
    ar, ac = anterior
    vb_centre = parts.deepest
    brows, bcols = np.nonzero(parts.block)
    dr, dc = brows * spacing[0] - vb_centre[0], bcols * spacing[1] - vb_centre[1]
    proj, lat = dr * ar + dc * ac, dr * ac - dc * ar
    slab = np.abs(proj) <= 0.5 * parts.depth_mm
    width = np.percentile(np.abs(lat[slab]), 95) if slab.any() else 1.3 * parts.depth_mm
    half_width = float(np.clip(width, 17.0, 28.0))
    half_depth = float(np.clip(parts.depth_mm, 10.0, 25.0))
    return BodyFrame(
        spacing_mm=spacing,
        shape=(int(hu.shape[0]), int(hu.shape[1])),
        body=body,
        centre=centre,
        spine=vb_centre,
        anterior=anterior,
        vb_half_width_mm=half_width,
        vb_half_depth_mm=half_depth,
        spine_found=True,
        outline_mm=_outline_radii(body, centre, spacing, anterior),
        spine_mask=spine,
    )


__all__ = ["REGION_NAMES", "BodyFrame", "body_frame", "fill_holes", "fill_small_holes", "largest_component"]
