"""A whole synthetic abdominal CT series (T11/T12 down to the sacrum) for the site workbench.

``make_series(out_dir, slices=72, size=160, seed=0)`` writes single-frame CT DICOM files
whose names are shuffled (sorting by name, or by InstanceNumber, which runs feet to head
here, gives the wrong order), plus a small distractor series (a thick low-resolution
reconstruction of the same patient) in the same folder. It returns a :class:`DemoSeries`
that knows the true slice range of every vertebral body, so tests can check the L3
suggestion.

Every axial slice is the L3 phantom (:mod:`common.demo.phantom`) of one patient with the
anatomy varied along z: vertebral bodies separated by discs (bone blended with disc by the
slab's overlap, like partial volume), the sacrum and iliac wings at the bottom, ribs at
the top, psoas growing caudally, kidneys, liver and stomach high, bowel loops that come and go.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid

from common.demo.anatomy import BowelLoop, Ellipse, PatientAnatomy, make_patient
from common.demo.phantom import apply_scanner, render_l3
from common.demo.structures import Structure
from common.dicom_io import PatientInfo, write_ct_slice

#: Vertebral bodies from the top of the scan; "S1" is the sacrum (no disc below it).
LEVELS: tuple[str, ...] = ("T11", "T12", "L1", "L2", "L3", "L4", "L5", "S1")
_BODY_MM = {"T11": 10.0, "T12": 24.0, "L1": 26.0, "L2": 27.0, "L3": 28.0, "L4": 28.0, "L5": 27.0, "S1": 70.0}
_DISC_MM = {"T11": 7.0, "T12": 8.0, "L1": 9.0, "L2": 10.0, "L3": 10.0, "L4": 11.0, "L5": 11.0}
DISC_HU = 85.0
TOP_Z_MM = 100.0  # patient z (superior positive) of the top of the scan


@dataclass(frozen=True)
class DemoSeries:
    """What :func:`make_series` wrote, with the ground truth of the vertebral levels."""

    folder: Path
    series_uid: str
    distractor_uid: str
    files: tuple[Path, ...]  #: main-series files, superior first
    spacing_mm: tuple[float, float, float]  #: (z, row, column)
    levels: dict[str, tuple[int, int]]  #: vertebra -> first, last slice index (superior first)
    height_m: float
    sex: str

    @property
    def l3(self) -> tuple[int, int]:
        return self.levels["L3"]


@dataclass(frozen=True)
class _Layout:
    """Vertebral bodies as depth intervals (mm from the top of the scan)."""

    bodies: dict[str, tuple[float, float]]

    def bone_fraction(self, top: float, bottom: float) -> float:
        overlap = sum(max(0.0, min(bottom, b) - max(top, a)) for a, b in self.bodies.values())
        return overlap / (bottom - top)

    def level(self, depth: float) -> float:
        """Continuous level coordinate: 0 at mid T12, 1 at mid L1, ... 6 at mid S1 (upper part)."""
        names = LEVELS[1:]
        mids = [sum(self.bodies[n]) / 2 if n != "S1" else self.bodies[n][0] + 14.0 for n in names]
        inside = float(np.interp(depth, mids, np.arange(len(mids))))
        # beyond the first / last centre: one level per 36 mm (a body plus a disc)
        return inside + min(0.0, depth - mids[0]) / 36.0 + max(0.0, depth - mids[-1]) / 36.0


def _layout(rng: np.random.Generator) -> _Layout:
    depth, bodies = 0.0, {}
    for name in LEVELS:
        height = _BODY_MM[name] * (rng.uniform(0.92, 1.08) if name not in ("T11", "S1") else 1.0)
        bodies[name] = (depth, depth + height)
        depth += height + _DISC_MM.get(name, 0.0) * rng.uniform(0.9, 1.1)
    return _Layout(bodies)


def _interp(u: float, table: tuple[float, ...]) -> float:
    """Value at level u from one value per level T11(-1) .. S1(6)."""
    return float(np.interp(u, np.arange(-1, len(table) - 1), table))


def _scaled(e: Ellipse, s: float) -> Ellipse:
    return replace(e, a=max(e.a * s, 0.5), b=max(e.b * s, 0.5))


def _bowel_at(
    base: tuple[BowelLoop, ...], centres: np.ndarray, halves: np.ndarray, u: float
) -> tuple[BowelLoop, ...]:
    out = []
    for loop, c, h in zip(base, centres, halves, strict=True):
        t = (u - c) / h
        if abs(t) >= 0.85:
            continue
        s = max(math.sqrt(1.0 - t * t), 0.55)
        drift = 6.0 * t
        out.append(replace(loop, shape=replace(_scaled(loop.shape, s), x=loop.shape.x + drift)))
    return tuple(out)


def _anatomy_at(a: PatientAnatomy, u: float, bowel: tuple[BowelLoop, ...]) -> PatientAnatomy:
    ps = _interp(u, (0.05, 0.15, 0.35, 0.65, 1.0, 1.25, 1.4, 1.35))
    ps_out = 1.0 + 0.35 * max(0.0, u - 5.0)
    psoas = tuple(replace(_scaled(p, ps), x=p.x * ps_out) for p in a.psoas)
    ql = _interp(u, (0.4, 0.6, 0.8, 0.95, 1.0, 0.9, 0.6, 0.05))
    quadratus = tuple(_scaled(q, ql) for q in a.quadratus)
    vb = a.vertebral_body
    width = _interp(u, (0.85, 0.88, 0.92, 0.96, 1.0, 1.04, 1.08, 1.45))
    vertebral_body = replace(vb, a=vb.a * width, y=vb.y + 6.0 * max(0.0, u - 5.5))
    kidneys = []
    for side, centre in ((1.0, 0.8), (-1.0, 1.2)):  # the right kidney (image left) sits lower
        t = (u - centre) / 1.7
        if abs(t) < 0.95:
            s = math.sqrt(1.0 - t * t)
            x = side * (a.psoas[1].x + 26.0 + 8.0 * max(0.0, 1.0 - u))
            y = a.quadratus[1].y - 22.0
            kidneys.append(Ellipse(x, y, 22.0 * s + 1, 16.0 * s + 1, side * 35.0))
    liver = None
    if u < 1.6:
        s = min(1.0, (1.6 - u) / 2.2)
        liver = Ellipse(-0.42 * a.body_a, a.centre_y - 15.0, 0.5 * a.body_a * s + 4, 70.0 * s + 4, 15.0)
    if u < 0.7:  # stomach high on the left, with an air-fluid level
        stomach = BowelLoop(Ellipse(0.38 * a.body_a, a.centre_y - 45.0, 38.0, 30.0), 3.0, "gas", 0.2)
        bowel = (stomach, *bowel)
    body = _interp(u, (1.04, 1.02, 1.0, 0.98, 0.97, 0.98, 1.02, 1.06))
    return replace(
        a,
        psoas=psoas,  # type: ignore[arg-type]
        quadratus=quadratus,  # type: ignore[arg-type]
        vertebral_body=vertebral_body,
        kidneys=tuple(kidneys),
        liver=liver,
        bowel=bowel,
        body_a=a.body_a * body,
    )


def _grid(size: int, fov_mm: float) -> np.ndarray:
    return (np.arange(size) - (size - 1) / 2) * (fov_mm / size)


def _paint_bone(hu: np.ndarray, coords: np.ndarray, e: Ellipse, cortex_mm: float, marrow: float) -> None:
    y, x = coords[:, None], coords[None, :]
    t = math.radians(e.angle_deg)
    dx, dy = x - e.x, y - e.y
    u = dx * math.cos(t) + dy * math.sin(t)
    v = -dx * math.sin(t) + dy * math.cos(t)
    rho = np.sqrt((u / e.a) ** 2 + (v / e.b) ** 2)
    hu[rho <= 1.0] = 750.0
    hu[(rho <= 1.0) & ((1.0 - rho) * min(e.a, e.b) > cortex_mm)] = marrow


def _extra_bones(hu: np.ndarray, coords: np.ndarray, a: PatientAnatomy, u: float) -> None:
    """Ribs at the top (down to upper T12), iliac wings from mid L5 down."""
    if u < 0.55:
        reach = a.body_a - a.sat_mm * a.sat_lateral_factor - a.skin_mm - 12.0
        for side in (-1.0, 1.0):
            _paint_bone(hu, coords, Ellipse(side * reach, a.centre_y + 25.0, 7.0, 4.5, side * 60), 1.5, 220.0)
            _paint_bone(
                hu, coords, Ellipse(side * (reach - 12), a.centre_y - 25.0, 7.0, 4.5, side * -50), 1.5, 220.0
            )
    if u > 4.6:
        grow = min(1.0, (u - 4.6) / 1.2)
        vb = a.vertebral_body
        for side in (-1.0, 1.0):
            wing = Ellipse(side * (vb.a + 62.0), vb.y + 4.0, 10.0 + 28.0 * grow, 9.0, side * -25)
            _paint_bone(hu, coords, wing, 2.5, 260.0)


def _render(
    a: PatientAnatomy, u: float, bone: float, size: int, fov: float, rng: np.random.Generator
) -> np.ndarray:
    phantom = render_l3(replace(a, texture_seed=int(rng.integers(0, 2**31 - 1))), size, fov)
    hu = phantom.hu.copy()
    body = phantom.structures == Structure.vertebral_body
    disc = DISC_HU + 8.0 * rng.standard_normal(int(body.sum()))
    hu[body] = bone * hu[body] + (1.0 - bone) * disc
    _extra_bones(hu, _grid(size, fov), a, u)
    return apply_scanner(hu, rng, noise_sd=10.0, blur_sigma_px=0.5)


def make_series(
    out_dir: Path | str, *, slices: int = 72, size: int = 160, seed: int = 0, distractor_slices: int = 5
) -> DemoSeries:
    """Write a synthetic abdominal CT series (T11 to sacrum) plus a distractor series; return the truth."""
    if not 24 <= slices <= 400:
        raise ValueError(f"slices must be 24..400 (enough to count vertebrae), got {slices}")
    if not 64 <= size <= 512:
        raise ValueError(f"size must be 64..512 pixels, got {size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    anatomy = make_patient(rng)
    layout = _layout(rng)
    length = layout.bodies["S1"][0] + 40.0  # down into the sacrum
    dz = round(length / slices, 2)
    half_w, half_h = anatomy.extent_mm
    fov = float(min(1000.0, math.ceil(2.3 * max(half_w, half_h) / 10.0) * 10.0))
    pixel = fov / size

    n_loops = len(anatomy.bowel)
    base_bowel = anatomy.bowel * 2
    centres = np.concatenate([rng.uniform(1.5, 5.5, n_loops), rng.uniform(1.5, 5.5, n_loops)])
    halves = np.concatenate([rng.uniform(0.7, 1.5, n_loops), rng.uniform(0.7, 1.5, n_loops)])
    centres[[0, 1]], halves[[0, 1]] = 3.5, 2.8  # ascending and descending colon run the whole way

    names = [f"IM{v:06d}.dcm" for v in rng.permutation(slices + distractor_slices) * 7 + 11]
    tag = f"sarcofed-demo-series-{seed}"
    study = generate_uid(entropy_srcs=[tag, "study"])
    series_uid = generate_uid(entropy_srcs=[tag, "series"])
    distractor_uid = generate_uid(entropy_srcs=[tag, "distractor"])
    frame = generate_uid(entropy_srcs=[tag, "frame"])
    patient = PatientInfo(
        patient_id="DEMO-SERIES",
        patient_name="DEMO^SERIES",
        sex=anatomy.sex,
        height_m=anatomy.height_m,
        age=f"{anatomy.age:03d}Y",
    )
    files: list[Path] = []
    for k in range(slices):
        top, bottom = k * dz, (k + 1) * dz
        depth = (top + bottom) / 2
        u = layout.level(depth)
        a = _anatomy_at(anatomy, u, _bowel_at(base_bowel, centres, halves, u))
        hu = _render(a, u, layout.bone_fraction(top, bottom), size, fov, rng)
        files.append(
            write_ct_slice(
                out / names[k],
                hu,
                spacing_mm=(pixel, pixel),
                patient=patient,
                study_uid=study,
                series_uid=series_uid,
                sop_uid=generate_uid(entropy_srcs=[tag, "sop", str(k)]),
                position_z=TOP_Z_MM - depth,
                instance_number=slices - k,  # numbered feet to head
                series_description="DEMO abdomen (synthetic, T11-sacrum)",
                frame_of_reference_uid=frame,
                slice_thickness_mm=dz,
            )
        )
    # Distractor: a few thick, low-resolution slices of the same patient around L2-L4.
    thick, small = 3.0 * dz, max(64, size // 2)
    centre = sum(layout.bodies["L3"]) / 2
    for j in range(distractor_slices):
        depth = centre + (j - (distractor_slices - 1) / 2) * thick
        u = layout.level(depth)
        a = _anatomy_at(anatomy, u, _bowel_at(base_bowel, centres, halves, u))
        bone = layout.bone_fraction(depth - thick / 2, depth + thick / 2)
        write_ct_slice(
            out / names[slices + j],
            _render(a, u, bone, small, fov, rng),
            spacing_mm=(fov / small, fov / small),
            patient=patient,
            study_uid=study,
            series_uid=distractor_uid,
            sop_uid=generate_uid(entropy_srcs=[tag, "distractor-sop", str(j)]),
            position_z=TOP_Z_MM - depth,
            instance_number=j + 1,
            series_description="DEMO thick recon (distractor)",
            frame_of_reference_uid=frame,
            slice_thickness_mm=thick,
        )
    levels: dict[str, tuple[int, int]] = {}
    for name, (a_mm, b_mm) in layout.bodies.items():
        inside = [k for k in range(slices) if a_mm <= (k + 0.5) * dz <= b_mm]
        if inside:
            levels[name] = (inside[0], inside[-1])
    return DemoSeries(
        folder=out,
        series_uid=str(series_uid),
        distractor_uid=str(distractor_uid),
        files=tuple(files),
        spacing_mm=(dz, pixel, pixel),
        levels=levels,
        height_m=anatomy.height_m,
        sex=anatomy.sex,
    )


__all__ = ["LEVELS", "DemoSeries", "make_series"]
