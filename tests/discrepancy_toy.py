"""A hand-built 128 x 128 L3-like slice for the discrepancy tests (3 mm pixels).

Geometry in mm, body centre at the origin, +y posterior before any rotation: an elliptic
body (150 x 110) with a 15 mm subcutaneous fat ring, a 12 mm abdominal wall muscle band
under it (anterior and lateral only), visceral fat inside, a vertebral body (22 x 16,
HU 250 with a 700 HU cortex) at y = 35, canal and posterior elements behind it, psoas
blobs beside it and paraspinal blobs behind it. ``angle_deg`` rotates the patient,
``shift_mm`` moves it, ``prone`` turns it upside down (180 degrees).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIZE = 128
SPACING = 3.0


@dataclass(frozen=True)
class Toy:
    hu: np.ndarray
    ref: np.ndarray  # canonical 0-3
    psoas: np.ndarray
    paraspinal: np.ndarray
    wall: np.ndarray
    spacing: tuple[float, float] = (SPACING, SPACING)


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float) -> np.ndarray:
    return ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 <= 1.0


def toy_slice(
    *,
    angle_deg: float = 0.0,
    shift_mm: tuple[float, float] = (0.0, 0.0),
    prone: bool = False,
    noise_sd: float = 0.0,
    seed: int = 0,
) -> Toy:
    coords = (np.arange(SIZE) - (SIZE - 1) / 2) * SPACING
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    yy, xx = yy - shift_mm[0], xx - shift_mm[1]
    t = np.radians(angle_deg + (180.0 if prone else 0.0))
    x = xx * np.cos(t) + yy * np.sin(t)  # patient coordinates
    y = -xx * np.sin(t) + yy * np.cos(t)

    a, b = 150.0, 110.0
    body = _ellipse(x, y, 0, 0, a, b)
    inner = _ellipse(x, y, 0, 0, a - 15, b - 15)
    cavity = _ellipse(x, y, 0, 0, a - 27, b - 27)
    wall = inner & ~cavity & (y < 40)
    vb = _ellipse(x, y, 0, 35, 22, 16)
    cortex = vb & ~_ellipse(x, y, 0, 35, 19, 13)
    canal = _ellipse(x, y, 0, 62, 9, 8)
    arch = _ellipse(x, y, 0, 62, 15, 14) & ~canal & ~vb
    spinous = (np.abs(x) <= 3.5) & (y >= 62) & (y <= 90)
    transverse = (y >= 52) & (y <= 58) & (np.abs(x) >= 15) & (np.abs(x) <= 50)
    psoas = (_ellipse(x, y, -38, 30, 15, 18) | _ellipse(x, y, 38, 30, 15, 18)) & ~vb
    paraspinal = (_ellipse(x, y, -28, 75, 22, 17) | _ellipse(x, y, 28, 75, 22, 17)) & ~(spinous | arch)

    hu = np.full((SIZE, SIZE), -1000.0, dtype=np.float32)
    hu[body] = -100.0  # subcutaneous fat
    hu[inner] = -90.0  # visceral fat (also between the back muscles)
    hu[wall] = 50.0
    hu[psoas] = 55.0
    hu[paraspinal] = 50.0
    hu[vb] = 250.0
    hu[cortex] = 700.0
    hu[arch | spinous | transverse] = 600.0
    hu[canal] = 20.0
    if noise_sd:
        hu = hu + np.random.default_rng(seed).normal(0, noise_sd, hu.shape).astype(np.float32)

    ref = np.zeros((SIZE, SIZE), dtype=np.uint8)
    ref[body & ~inner] = 2
    bone = vb | arch | spinous | transverse | canal
    ref[inner & ~bone] = 3
    muscle = wall | psoas | paraspinal
    ref[muscle] = 1
    return Toy(hu=hu, ref=ref, psoas=psoas, paraspinal=paraspinal, wall=wall)
