"""Random but plausible L3 anatomy for one synthetic patient, in millimetres.

``make_patient(rng)`` draws everything that makes one patient differ from another (body
size and shape, fat distribution, muscle bulk, intramuscular fat, bowel content, contrast
phase, tissue densities) and places every organ in patient coordinates: x to the image
right (the patient's left), y down the image (posterior), origin at the image centre.
Nothing here depends on pixels, so the same patient renders at any size and field of view
(:func:`common.demo.phantom.render_l3`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

Sex = Literal["M", "F"]
BowelContent = Literal["fluid", "collapsed", "gas", "contrast", "stool"]


@dataclass(frozen=True)
class Ellipse:
    """An ellipse in mm: centre (x, y), semi-axes a (along x before rotation) and b."""

    x: float
    y: float
    a: float
    b: float
    angle_deg: float = 0.0

    @property
    def extent(self) -> float:
        """Radius of a circle that contains the ellipse."""
        return max(self.a, self.b)


@dataclass(frozen=True)
class BowelLoop:
    """A bowel loop seen in cross-section: a wall ring around its content."""

    shape: Ellipse
    wall_mm: float
    content: BowelContent
    level: float  # air-fluid level as a fraction of the inner height (-1 top .. 1 bottom)


@dataclass(frozen=True)
class TissueHU:
    """Mean Hounsfield units of this patient's tissues (before texture and scanner noise)."""

    skin: float
    subcutaneous_fat: float
    visceral_fat: float
    muscle: float
    intramuscular_fat: float
    trabecular_bone: float
    cortical_bone: float
    spinal_canal: float
    kidney: float
    vessel: float
    liver: float
    bowel_wall: float
    bowel_fluid: float
    oral_contrast: float
    fascia: float


@dataclass(frozen=True)
class PatientAnatomy:
    """One synthetic patient at the L3 level (all lengths in mm)."""

    sex: Sex
    height_m: float
    age: int
    adiposity: float  # 0 lean .. 1 obese
    visceral_share: float  # share of body fat that is visceral
    muscle_bulk: float  # ~1 for an average man
    imat_amount: float  # relative density of intramuscular fat islands
    iv_contrast: bool
    oral_contrast: bool
    # outline: ellipse with separate anterior/posterior semi-axes, a flattened back
    # (lying on the couch) and small harmonic irregularities (k, amplitude, phase)
    centre_y: float
    body_a: float
    body_b_ant: float
    body_b_post: float
    back_y: float  # the back is flat at this y (couch side)
    outline: tuple[tuple[int, float, float], ...]
    skin_mm: float
    sat_mm: float  # anterior subcutaneous fat thickness
    sat_lateral_factor: float
    sat_posterior_factor: float
    sat_profile: tuple[tuple[int, float, float], ...]
    wall_mm: float  # lateral abdominal wall (three layers)
    rectus_mm: float
    rectus_half_width: float
    linea_alba_mm: float
    psoas: tuple[Ellipse, Ellipse]
    paraspinal: tuple[Ellipse, Ellipse]
    quadratus: tuple[Ellipse, Ellipse]
    vertebral_body: Ellipse
    cortex_mm: float
    canal: Ellipse
    transverse_y: float
    transverse_reach: float
    spinous_end_y: float
    kidneys: tuple[Ellipse, ...]
    liver: Ellipse | None
    aorta: Ellipse
    ivc: Ellipse
    mesenteric: tuple[Ellipse, ...]
    bowel: tuple[BowelLoop, ...]
    imat_islands: tuple[Ellipse, ...]  # candidates; only those centred in muscle are drawn
    hu: TissueHU
    texture_seed: int

    @property
    def extent_mm(self) -> tuple[float, float]:
        """Half-width and half-height of the body (for choosing a field of view)."""
        amp = 1.0 + sum(abs(a) for _, a, _ in self.outline)
        return self.body_a * amp, max(self.body_b_ant, self.body_b_post) * amp


def harmonic(phi: np.ndarray | float, terms: tuple[tuple[int, float, float], ...]) -> np.ndarray | float:
    """1 + sum(amp * cos(k * phi + phase)): a smooth irregularity factor around the body."""
    out = np.ones_like(phi, dtype=np.float64) if isinstance(phi, np.ndarray) else 1.0
    for k, amp, phase in terms:
        out = out + amp * np.cos(k * phi + phase)
    return out


def sat_thickness(anatomy: PatientAnatomy, phi: np.ndarray | float) -> np.ndarray | float:
    """Subcutaneous fat thickness (mm) at angle ``phi`` (0 anterior, +-pi posterior)."""
    lateral = np.sin(phi) ** 2
    posterior = np.clip(-np.cos(phi), 0.0, 1.0)
    factor = (
        1.0
        + (anatomy.sat_lateral_factor - 1.0) * lateral
        + (anatomy.sat_posterior_factor - 1.0) * posterior**2
    )
    return anatomy.sat_mm * factor * harmonic(phi, anatomy.sat_profile)


def _clip_normal(rng: np.random.Generator, mean: float, sd: float, lo: float, hi: float) -> float:
    return float(np.clip(rng.normal(mean, sd), lo, hi))


def _tissue_hu(rng: np.random.Generator, age: int, imat: float, iv: bool) -> TissueHU:
    older = max(age - 40, 0)
    return TissueHU(
        skin=_clip_normal(rng, 45, 8, 20, 70),
        subcutaneous_fat=_clip_normal(rng, -102, 6, -120, -85),
        visceral_fat=_clip_normal(rng, -95, 6, -115, -80),
        muscle=_clip_normal(rng, 50 - 0.3 * older - 3 * imat, 5, 18, 62),
        intramuscular_fat=_clip_normal(rng, -80, 8, -110, -55),
        trabecular_bone=_clip_normal(rng, 240 - 2.0 * older, 25, 90, 300),
        cortical_bone=_clip_normal(rng, 800, 90, 600, 1100),
        spinal_canal=_clip_normal(rng, 22, 5, 5, 35),
        kidney=_clip_normal(rng, 160 if iv else 33, 15 if iv else 4, 20, 220),
        vessel=_clip_normal(rng, 190 if iv else 42, 30 if iv else 4, 30, 300),
        liver=_clip_normal(rng, 105 if iv else 58, 10 if iv else 6, 35, 140),
        bowel_wall=_clip_normal(rng, 80 if iv else 35, 10, 20, 110),
        bowel_fluid=_clip_normal(rng, 10, 5, -5, 25),
        oral_contrast=_clip_normal(rng, 260, 40, 170, 350),
        fascia=_clip_normal(rng, 70, 8, 45, 95),
    )


def _bowel(
    rng: np.random.Generator,
    cavity: Ellipse,
    coverage: float,
    oral: bool,
    colon_x: float,
    colon_y: float,
) -> tuple[BowelLoop, ...]:
    """Loops of small bowel in the anterior cavity plus ascending and descending colon."""
    contents: list[BowelContent] = ["fluid", "collapsed", "gas", "stool"]
    probs = [0.4, 0.25, 0.2, 0.15]
    if oral:
        contents.append("contrast")
        probs = [0.25, 0.15, 0.15, 0.1, 0.35]
    loops: list[BowelLoop] = []
    for side, big in ((-1.0, True), (1.0, False)):  # ascending colon is the wider one
        r = rng.uniform(18, 26) if big else rng.uniform(12, 18)
        loops.append(
            BowelLoop(
                Ellipse(side * colon_x, colon_y + rng.normal(0, 6), r, r * rng.uniform(0.8, 1.1)),
                wall_mm=rng.uniform(1.5, 2.5),
                content=rng.choice(np.array(["stool", "gas"]), p=[0.7, 0.3]).item(),
                level=rng.uniform(-0.5, 0.3),
            )
        )
    target = coverage * math.pi * cavity.a * cavity.b
    covered = 0.0
    for _ in range(400):
        if covered >= target:
            break
        # uniform point in the cavity ellipse
        t, rad = rng.uniform(0, 2 * math.pi), math.sqrt(rng.uniform(0, 1))
        x, y = cavity.x + rad * cavity.a * math.cos(t), cavity.y + rad * cavity.b * math.sin(t)
        content = contents[int(rng.choice(len(contents), p=probs))]
        r = rng.uniform(5, 9) if content == "collapsed" else rng.uniform(8, 17)
        loops.append(
            BowelLoop(
                Ellipse(x, y, r, r * rng.uniform(0.6, 1.0), rng.uniform(0, 180)),
                wall_mm=rng.uniform(1.5, 3.0) if content != "collapsed" else r,
                content=content,
                level=rng.uniform(-0.6, 0.6),
            )
        )
        covered += 0.8 * math.pi * r * r
    return tuple(loops)


def make_patient(rng: np.random.Generator) -> PatientAnatomy:
    """Draw one random patient (sex, size, fat, muscle, organs) from ``rng``."""
    sex: Sex = "M" if rng.random() < 0.5 else "F"
    male = sex == "M"
    height = _clip_normal(rng, 1.71 if male else 1.58, 0.065, 1.45, 1.95)
    age = int(rng.integers(28, 88))
    older = max(age - 50, 0)
    adiposity = float(rng.beta(2.0, 2.2))
    visceral_share = _clip_normal(rng, 0.6 if male else 0.35, 0.12, 0.1, 0.9)
    bulk = float(np.clip(rng.normal(1.0 if male else 0.86, 0.11) * (1 - 0.004 * older), 0.55, 1.3))
    imat = float(np.clip(rng.gamma(2.0, 0.35) * (0.6 + adiposity) * (1 + older / 40), 0.1, 3.0))
    iv, oral = bool(rng.random() < 0.55), bool(rng.random() < 0.35)

    skin = rng.uniform(1.5, 2.5)
    sat = float(np.clip(5 + 45 * adiposity * (1.1 - 0.7 * visceral_share) + rng.normal(0, 3), 3, 60))
    sat_lat, sat_post = rng.uniform(0.7, 1.1), rng.uniform(0.45, 0.85)
    vat_mm = 80 * adiposity * visceral_share + rng.normal(0, 3)
    wall = 14.5 * bulk * rng.uniform(0.85, 1.15)
    rectus = 11.5 * bulk * rng.uniform(0.85, 1.15)

    # posterior block, built forward from the back skin (y = 0 for now, shifted later)
    back_skin = 0.0
    fascia_post = back_skin - skin - sat * sat_post
    pa_a, pa_b = 30 * bulk * rng.uniform(0.9, 1.1), 30 * bulk * rng.uniform(0.9, 1.1)
    pa_x, pa_y = pa_a + rng.uniform(2, 5), fascia_post - 0.85 * pa_b
    canal_r = rng.uniform(8, 11)
    canal_y = pa_y - pa_b + 3 + canal_r * 0.3
    vb_a, vb_b = rng.uniform(21, 26) * (1.05 if male else 0.95), rng.uniform(15, 19)
    vb_y = canal_y - canal_r - vb_b + 2
    vb_front = vb_y - vb_b
    ps_a, ps_b = 17 * bulk * rng.uniform(0.85, 1.15), 20 * bulk * rng.uniform(0.85, 1.15)
    ps_x = vb_a + ps_a * 0.75
    asym = rng.normal(1.0, 0.04)
    psoas = (
        Ellipse(-ps_x, vb_y - 0.25 * ps_b, ps_a, ps_b * asym, rng.normal(-15, 5)),
        Ellipse(ps_x, vb_y - 0.25 * ps_b, ps_a * asym, ps_b, rng.normal(15, 5)),
    )
    ql_a, ql_b = 15 * bulk * rng.uniform(0.8, 1.2), 9 * bulk * rng.uniform(0.8, 1.2)
    ql_x, ql_y = pa_x + pa_a * 0.75 + ql_a * 0.5, canal_y - 4
    quadratus = (Ellipse(-ql_x, ql_y, ql_a, ql_b, -30), Ellipse(ql_x, ql_y, ql_a, ql_b, 30))

    core_a = vb_a + 2 * ps_a + 55 + vat_mm + rng.normal(0, 4)
    ant_space = 30 + 1.6 * vat_mm + 25 * (1 - visceral_share) * adiposity + rng.uniform(0, 10)
    cavity_front = vb_front - ant_space
    front_skin = cavity_front - rectus - sat - skin
    centre_y = vb_y - 10
    back_flat = rng.uniform(0.9, 0.97)
    body_b_post = (back_skin - centre_y) / back_flat
    body_b_ant = centre_y - front_skin
    body_a = core_a + wall + sat * sat_lat + skin
    # shift so that the body is centred on the image (the couch side a little lower)
    shift = -(front_skin + back_skin) / 2 - 5.0

    def moved(e: Ellipse) -> Ellipse:
        return replace(e, y=e.y + shift)

    kidneys: list[Ellipse] = []
    for side in (-1.0, 1.0):
        if rng.random() < 0.6:  # lower poles are often still visible at L3
            k_a, k_b = rng.uniform(16, 26), rng.uniform(13, 20)
            kx = side * (ps_x + ps_a + k_a * 0.7)
            kidneys.append(Ellipse(kx, ql_y - ql_b - k_b * 0.6, k_a, k_b, side * rng.uniform(20, 50)))
    liver = None
    if rng.random() < 0.3:  # inferior tip of the right lobe
        liver = Ellipse(-(core_a - 35), cavity_front + 45, rng.uniform(20, 35), rng.uniform(25, 45), 20)
    aorta_r = rng.uniform(8, 12) * (1 + older / 150)
    aorta = Ellipse(aorta_r * 0.6, vb_front - aorta_r - 1, aorta_r, aorta_r)
    ivc = Ellipse(-vb_a * 0.8, vb_front - 8, rng.uniform(10, 15), rng.uniform(6, 9), rng.uniform(-10, 10))

    cavity = Ellipse(0.0, (cavity_front + vb_front) / 2 - 5, core_a - 20, (vb_front - cavity_front) / 2 + 15)
    coverage = float(np.clip(1.0 - 0.25 - 0.6 * adiposity * visceral_share, 0.3, 0.85))
    bowel = _bowel(rng, cavity, coverage, oral, core_a - 25, vb_y - 5)
    mesenteric = tuple(
        Ellipse(
            cavity.x + rng.uniform(-0.6, 0.6) * cavity.a,
            cavity.y + rng.uniform(-0.6, 0.6) * cavity.b,
            r := rng.uniform(1.0, 2.5),
            r,
        )
        for _ in range(int(rng.integers(6, 25)))
    )

    half_w, top, bottom = body_a * 1.1, front_skin - 5, back_skin + 5
    n_islands = int(imat * 260)
    islands = tuple(
        Ellipse(
            rng.uniform(-half_w, half_w),
            rng.uniform(top, bottom) + shift,
            r := min(0.5 + rng.exponential(0.8), 3.5),
            r * rng.uniform(0.4, 1.0),
            rng.uniform(0, 180),
        )
        for _ in range(n_islands)
    )
    outline = tuple(
        (k, rng.normal(0, 0.02 if k > 2 else 0.03), rng.uniform(0, 2 * math.pi)) for k in (2, 3, 4, 5)
    )
    sat_profile = tuple((k, rng.normal(0, 0.12), rng.uniform(0, 2 * math.pi)) for k in (1, 2, 3))
    return PatientAnatomy(
        sex=sex,
        height_m=round(height, 2),
        age=age,
        adiposity=adiposity,
        visceral_share=visceral_share,
        muscle_bulk=bulk,
        imat_amount=imat,
        iv_contrast=iv,
        oral_contrast=oral,
        centre_y=centre_y + shift,
        body_a=body_a,
        body_b_ant=body_b_ant,
        body_b_post=body_b_post,
        back_y=back_skin + shift,
        outline=outline,
        skin_mm=skin,
        sat_mm=sat,
        sat_lateral_factor=sat_lat,
        sat_posterior_factor=sat_post,
        sat_profile=sat_profile,
        wall_mm=wall,
        rectus_mm=rectus,
        rectus_half_width=rng.uniform(45, 65),
        linea_alba_mm=rng.uniform(3, 6) + 10 * adiposity,
        psoas=(moved(psoas[0]), moved(psoas[1])),
        paraspinal=(Ellipse(-pa_x, pa_y + shift, pa_a, pa_b, 8), Ellipse(pa_x, pa_y + shift, pa_a, pa_b, -8)),
        quadratus=(moved(quadratus[0]), moved(quadratus[1])),
        vertebral_body=Ellipse(0.0, vb_y + shift, vb_a, vb_b),
        cortex_mm=rng.uniform(1.2, 2.0),
        canal=Ellipse(0.0, canal_y + shift, canal_r * 1.1, canal_r * 0.85),
        transverse_y=canal_y - canal_r * 0.4 + shift,
        transverse_reach=pa_x + pa_a * 0.55,
        spinous_end_y=fascia_post - 4 + shift,
        kidneys=tuple(moved(k) for k in kidneys),
        liver=moved(liver) if liver else None,
        aorta=moved(aorta),
        ivc=moved(ivc),
        mesenteric=tuple(moved(m) for m in mesenteric),
        bowel=tuple(replace(b, shape=moved(b.shape)) for b in bowel),
        imat_islands=islands,
        hu=_tissue_hu(rng, age, imat, iv),
        texture_seed=int(rng.integers(0, 2**31 - 1)),
    )


def next_level(anatomy: PatientAnatomy, rng: np.random.Generator) -> PatientAnatomy:
    """The same patient a few millimetres lower (a second L3 slice sharing the patient)."""
    grow = rng.uniform(1.03, 1.08)  # psoas widens caudally
    bowel = tuple(
        replace(
            loop,
            shape=replace(
                loop.shape,
                x=loop.shape.x + rng.normal(0, 5),
                y=loop.shape.y + rng.normal(0, 5),
                a=loop.shape.a * rng.uniform(0.85, 1.15),
                b=loop.shape.b * rng.uniform(0.85, 1.15),
            ),
        )
        for loop in anatomy.bowel
    )
    islands = tuple(
        replace(e, x=e.x + rng.normal(0, 1.5), y=e.y + rng.normal(0, 1.5)) for e in anatomy.imat_islands
    )
    return replace(
        anatomy,
        psoas=tuple(replace(p, a=p.a * grow, b=p.b * grow) for p in anatomy.psoas),  # type: ignore[arg-type]
        vertebral_body=replace(anatomy.vertebral_body, a=anatomy.vertebral_body.a * rng.uniform(1.0, 1.04)),
        bowel=bowel,
        imat_islands=islands,
        texture_seed=int(rng.integers(0, 2**31 - 1)),
    )


__all__ = [
    "BowelLoop",
    "Ellipse",
    "PatientAnatomy",
    "TissueHU",
    "harmonic",
    "make_patient",
    "next_level",
    "sat_thickness",
]
