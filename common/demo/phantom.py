"""A synthetic CT slice at L3: anatomy -> (HU image, fine structure map).

Three pure steps, each seeded or deterministic:

- :func:`make_patient` (``common.demo.anatomy``) draws one patient from an
  ``np.random.Generator``;
- :func:`render_l3` draws that patient on a ``size`` x ``size`` grid covering ``fov_mm``:
  geometry is in millimetres, so changing the pixel spacing keeps areas physical;
- :func:`apply_scanner` adds what a scanner adds (reconstruction blur and noise).

Labels are not drawn here: :func:`common.demo.labels.canonical_labels` turns the structure
map into a reader's mask under a :class:`~common.demo.labels.LabelConvention`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from common.demo.anatomy import Ellipse, PatientAnatomy, harmonic, make_patient, next_level, sat_thickness
from common.demo.labels import REFERENCE, LabelConvention, canonical_labels, imat_mask
from common.demo.structures import MUSCLE_STRUCTURES, Structure

S = Structure


@dataclass(frozen=True, eq=False)
class PhantomSlice:
    """One rendered slice: HU before scanner effects, and what each pixel is."""

    hu: np.ndarray  # float32 (size, size)
    structures: np.ndarray  # uint8 (size, size), values of Structure
    spacing_mm: float

    @property
    def pixel_area_cm2(self) -> float:
        return self.spacing_mm**2 / 100.0


class _Grid:
    """Pixel-centre coordinates (mm) of a square image centred on the origin."""

    def __init__(self, size: int, fov_mm: float) -> None:
        self.size = size
        self.spacing = fov_mm / size
        self.coords = ((np.arange(size) - (size - 1) / 2) * self.spacing).astype(np.float64)

    def _index(self, value: float) -> int:
        return math.floor(value / self.spacing + (self.size - 1) / 2)

    def window(self, e: Ellipse, margin: float = 0.0) -> tuple[slice, slice, np.ndarray, np.ndarray]:
        """Rows/cols slices around ``e`` and the local (u, v) coordinates in the ellipse frame."""
        r = e.extent + margin + self.spacing
        r0, r1 = max(self._index(e.y - r), 0), min(self._index(e.y + r) + 2, self.size)
        c0, c1 = max(self._index(e.x - r), 0), min(self._index(e.x + r) + 2, self.size)
        rows, cols = slice(r0, max(r0, r1)), slice(c0, max(c0, c1))
        dy = self.coords[rows][:, None] - e.y
        dx = self.coords[cols][None, :] - e.x
        t = math.radians(e.angle_deg)
        u = dx * math.cos(t) + dy * math.sin(t)
        v = -dx * math.sin(t) + dy * math.cos(t)
        return rows, cols, u, v

    def ellipse(self, e: Ellipse, shrink: float = 0.0) -> tuple[slice, slice, np.ndarray]:
        """Window slices and the boolean mask of ``e`` shrunk by ``shrink`` mm."""
        rows, cols, u, v = self.window(e)
        a, b = max(e.a - shrink, 1e-3), max(e.b - shrink, 1e-3)
        return rows, cols, (u / a) ** 2 + (v / b) ** 2 <= 1.0


def _paint(struct: np.ndarray, grid: _Grid, e: Ellipse, value: Structure, where: np.ndarray | None) -> None:
    rows, cols, inside = grid.ellipse(e)
    if where is not None:
        inside &= where[rows, cols]
    struct[rows, cols][inside] = value


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma_px: float) -> np.ndarray:
    """Unit-variance smooth random field."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), max(sigma_px, 0.3), mode="wrap")
    sd = float(field.std())
    return field / sd if sd > 0 else field


def _body_and_walls(a: PatientAnatomy, grid: _Grid) -> tuple[np.ndarray, np.ndarray]:
    """Skin, subcutaneous fat, abdominal wall layers; the rest of the inside is visceral fat."""
    y, x = grid.coords[:, None], grid.coords[None, :]
    phi = np.arctan2(x, -(y - a.centre_y))  # 0 anterior, +-pi posterior
    semi_b = np.where(y < a.centre_y, a.body_b_ant, a.body_b_post)
    level = np.hypot(x / a.body_a, (y - a.centre_y) / semi_b) / harmonic(phi, a.outline) - 1.0
    # sub-pixel distance to the outline (first order: level / |gradient|), exact at the flat back
    grad_r, grad_c = np.gradient(level, grid.spacing)
    near = np.minimum(-level / np.maximum(np.hypot(grad_r, grad_c), 1e-9), a.back_y - y)
    body = near >= 0
    depth = near
    struct = np.full(body.shape, S.air, dtype=np.uint8)
    struct[body] = S.skin
    struct[body & (depth >= a.skin_mm)] = S.subcutaneous_fat
    fascia = a.skin_mm + sat_thickness(a, phi)
    inner = body & (depth >= fascia)
    struct[inner] = S.visceral_fat

    anterior = y < a.centre_y
    abs_phi, abs_x = np.abs(phi), np.abs(x)
    lateral_t = a.wall_mm * (0.8 + 0.3 * np.sin(phi) ** 2)
    lateral_t = np.where(abs_phi > 0.72 * math.pi, 0.4 * a.wall_mm, lateral_t)  # latissimus only
    lateral_t = np.where(abs_phi > 0.86 * math.pi, 0.0, lateral_t)
    rectus_zone = anterior & (abs_x < a.rectus_half_width)
    thick = np.where(rectus_zone, a.rectus_mm * (1 - 0.4 * (abs_x / a.rectus_half_width) ** 4), lateral_t)
    into = depth - fascia
    band = inner & (into < thick)
    struct[band] = S.abdominal_wall_muscle
    # fat planes between external oblique, internal oblique and transversus
    frac = into / np.maximum(thick, 1e-3)
    plane = 0.9 / np.maximum(thick, 1e-3)
    layered = band & ~rectus_zone & (abs_phi <= 0.72 * math.pi)
    for cut in (0.36, 0.68):
        struct[layered & (np.abs(frac - cut) < plane / 2)] = S.intramuscular_fat
    # linea alba and linea semilunaris: tendon, not muscle
    struct[band & anterior & (abs_x < a.linea_alba_mm / 2)] = S.fascia
    semilunar = band & anterior & (abs_x >= a.rectus_half_width) & (abs_x < a.rectus_half_width + 3.0)
    struct[semilunar] = S.fascia
    return struct, inner


def _spine(a: PatientAnatomy, grid: _Grid, struct: np.ndarray) -> None:
    vb, canal = a.vertebral_body, a.canal
    _paint(struct, grid, vb, S.vertebral_body, None)
    ring = Ellipse(canal.x, canal.y + 2, canal.a + 6, canal.b + 6)
    _paint(struct, grid, ring, S.posterior_elements, struct != S.vertebral_body)
    spin_len = a.spinous_end_y - canal.y
    spinous = Ellipse(0.0, canal.y + spin_len / 2 + canal.b / 2, 3.5, spin_len / 2 - canal.b / 2 + 2)
    _paint(struct, grid, spinous, S.posterior_elements, None)
    for side in (-1.0, 1.0):
        tp = Ellipse(side * a.transverse_reach / 2, a.transverse_y, a.transverse_reach / 2, 3.0, side * -6)
        _paint(struct, grid, tp, S.posterior_elements, None)
    _paint(struct, grid, canal, S.spinal_canal, None)


def _bowel(
    a: PatientAnatomy, grid: _Grid, struct: np.ndarray, extra: np.ndarray, rng: np.random.Generator
) -> None:
    """Loops drawn only over visceral fat; ``extra`` receives HU for fluid content."""
    hu = a.hu
    for loop in a.bowel:
        rows, cols, u, v = grid.window(loop.shape)
        e = loop.shape
        outer = ((u / e.a) ** 2 + (v / e.b) ** 2 <= 1.0) & (struct[rows, cols] == S.visceral_fat)
        ia, ib = max(e.a - loop.wall_mm, 0.1), max(e.b - loop.wall_mm, 0.1)
        lumen = outer & ((u / ia) ** 2 + (v / ib) ** 2 <= 1.0)
        win_s, win_x = struct[rows, cols], extra[rows, cols]
        win_s[outer] = S.bowel
        if loop.content == "collapsed" or not lumen.any():
            continue
        local_y = grid.coords[rows][:, None] - e.y + np.zeros_like(u)
        above = local_y < loop.level * ib  # gas rises to the front (the patient lies supine)
        if loop.content == "fluid":
            win_x[lumen] = hu.bowel_fluid
        elif loop.content == "gas":
            win_s[lumen & above] = S.bowel_gas
            win_x[lumen & ~above] = hu.bowel_fluid
        elif loop.content == "contrast":
            win_s[lumen] = S.contrast_bowel
            win_s[lumen & above & (local_y < (loop.level - 0.5) * ib)] = S.bowel_gas
        else:  # stool: soft content with trapped gas bubbles
            bubbles = _smooth_noise(rng, u.shape, 1.2 / grid.spacing) > 0.9
            win_x[lumen] = hu.bowel_fluid + 15
            win_s[lumen & bubbles] = S.bowel_gas


def _imat(a: PatientAnatomy, grid: _Grid, struct: np.ndarray) -> None:
    """Intramuscular fat islands whose centre lies in a muscle (they never leave it)."""
    muscle = np.isin(struct, MUSCLE_STRUCTURES)
    for e in a.imat_islands:
        i, j = grid._index(e.y + grid.spacing / 2), grid._index(e.x + grid.spacing / 2)
        if not (0 <= i < grid.size and 0 <= j < grid.size) or not muscle[i, j]:
            continue
        rows, cols, inside = grid.ellipse(e)
        inside &= muscle[rows, cols]
        struct[rows, cols][inside] = S.intramuscular_fat


def _couch(a: PatientAnatomy, grid: _Grid, struct: np.ndarray, extra: np.ndarray) -> None:
    y, x = grid.coords[:, None], grid.coords[None, :]
    top = a.back_y + 8.0 + 0.0006 * x**2  # a gently curved couch
    shell = (y >= top) & (y < top + 25) & (np.abs(x) < a.body_a * 1.3) & (struct == S.air)
    struct[shell] = S.table
    skin = shell & ((y < top + 2.5) | (y >= top + 22.5))
    extra[shell] = np.where(skin[shell], 250.0, -700.0)


def render_l3(anatomy: PatientAnatomy, size: int, fov_mm: float) -> PhantomSlice:
    """Draw ``anatomy`` on a ``size`` x ``size`` grid covering ``fov_mm`` (noise-free HU)."""
    if size < 16 or not 50.0 <= fov_mm <= 1000.0:
        raise ValueError(
            f"render_l3 needs size >= 16 and fov_mm in 50..1000, got size={size}, fov_mm={fov_mm}"
        )
    a, grid = anatomy, _Grid(size, fov_mm)
    rng = np.random.default_rng(a.texture_seed)
    extra = np.full((size, size), np.nan, dtype=np.float32)  # explicit HU where a structure has several
    struct, inner = _body_and_walls(a, grid)
    in_cavity = inner & (struct == S.visceral_fat)
    if a.liver is not None:
        _paint(struct, grid, a.liver, S.liver, in_cavity)
    for kidney in a.kidneys:
        _paint(struct, grid, kidney, S.kidney, inner)
    not_wall = inner & (struct != S.abdominal_wall_muscle)
    for e in a.quadratus:
        _paint(struct, grid, e, S.quadratus_lumborum, not_wall)
    for e in a.psoas:
        _paint(struct, grid, e, S.psoas, inner)
    for e in a.paraspinal:
        _paint(struct, grid, e, S.paraspinal, inner)
    _spine(a, grid, struct)
    for vessel in (a.aorta, a.ivc):
        _paint(struct, grid, vessel, S.vessel, struct == S.visceral_fat)
    # fat behind the transverse processes, between the back muscles, is intermuscular
    y, x = grid.coords[:, None], grid.coords[None, :]
    back = (y > a.transverse_y) & (np.abs(x) < a.paraspinal[1].x + a.paraspinal[1].a + 8)
    struct[back & (struct == S.visceral_fat)] = S.intramuscular_fat
    _bowel(a, grid, struct, extra, rng)
    for vessel in a.mesenteric:
        _paint(struct, grid, vessel, S.vessel, struct == S.visceral_fat)
    _imat(a, grid, struct)
    _couch(a, grid, struct, extra)
    hu = _hu(a, grid, struct, extra, rng)
    return PhantomSlice(hu=hu, structures=struct, spacing_mm=grid.spacing)


def _hu(
    a: PatientAnatomy, grid: _Grid, struct: np.ndarray, extra: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    t = a.hu
    lut = np.zeros(len(Structure), dtype=np.float32)
    lut[S.air] = -1000
    lut[S.skin] = t.skin
    lut[S.subcutaneous_fat] = t.subcutaneous_fat
    lut[list(MUSCLE_STRUCTURES)] = t.muscle
    lut[S.psoas] = t.muscle + 4  # psoas is usually a little denser
    lut[S.intramuscular_fat] = t.intramuscular_fat
    lut[S.visceral_fat] = t.visceral_fat
    lut[S.vertebral_body] = t.trabecular_bone
    lut[S.posterior_elements] = 0.6 * t.cortical_bone
    lut[S.spinal_canal] = t.spinal_canal
    lut[S.kidney] = t.kidney
    lut[S.bowel] = t.bowel_wall
    lut[S.bowel_gas] = -990
    lut[S.contrast_bowel] = t.oral_contrast
    lut[S.vessel] = t.vessel
    lut[S.liver] = t.liver
    lut[S.fascia] = t.fascia
    lut[S.table] = -700
    hu = lut[struct]
    has_extra = ~np.isnan(extra)
    hu[has_extra] = extra[has_extra]
    # tissue textures (fat septa, muscle fibres, trabecular bone), scale in mm
    soft = _smooth_noise(rng, struct.shape, 1.5 / grid.spacing)
    fine = _smooth_noise(rng, struct.shape, 0.6 / grid.spacing)
    amp = np.zeros(len(Structure), dtype=np.float32)
    amp[[S.subcutaneous_fat, S.visceral_fat]] = 7
    amp[list(MUSCLE_STRUCTURES)] = 5
    amp[[S.kidney, S.liver, S.bowel]] = 6
    amp[S.contrast_bowel] = 30
    hu += amp[struct] * soft
    bone = struct == S.vertebral_body
    hu[bone] += 45 * fine[bone]
    # cortical rim of the vertebral body
    vb = a.vertebral_body
    rows, cols, u, v = grid.window(vb)
    rho = np.sqrt((u / vb.a) ** 2 + (v / vb.b) ** 2)
    rim = (rho <= 1.0) & ((1.0 - rho) * min(vb.a, vb.b) < a.cortex_mm) & bone[rows, cols]
    hu[rows, cols][rim] = t.cortical_bone
    return hu.astype(np.float32)


def apply_scanner(
    hu: np.ndarray, rng: np.random.Generator, noise_sd: float, blur_sigma_px: float
) -> np.ndarray:
    """Reconstruction blur (partial volume) then slightly correlated quantum noise, in HU."""
    if noise_sd < 0 or blur_sigma_px < 0:
        raise ValueError(f"noise_sd and blur_sigma_px must be >= 0, got {noise_sd}, {blur_sigma_px}")
    out = ndimage.gaussian_filter(hu.astype(np.float32), blur_sigma_px) if blur_sigma_px > 0 else hu.copy()
    if noise_sd > 0:
        noise = ndimage.gaussian_filter(rng.standard_normal(hu.shape).astype(np.float32), 0.6)
        out += noise * (noise_sd / max(float(noise.std()), 1e-6))
    return np.clip(out, -1024.0, 3071.0).astype(np.float32)


__all__ = [
    "REFERENCE",
    "LabelConvention",
    "PatientAnatomy",
    "PhantomSlice",
    "Structure",
    "apply_scanner",
    "canonical_labels",
    "imat_mask",
    "make_patient",
    "next_level",
    "render_l3",
]
