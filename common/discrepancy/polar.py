"""Polar maps of discordant area: angle around the body centroid x radius normalised by the outline.

Angle bins cover 0..360 degrees: 0 is anterior (derived from the spine, see
``common.discrepancy.frame``), 90 is image-right when anterior is image-up (the patient's
left on a supine slice in radiological display), 180 posterior. Radius bins cover 0 (body
centroid) to 1 (body outline at that angle). Values are cm^2, so maps add over slices.
"""

from __future__ import annotations

import numpy as np

from common.discrepancy.frame import BodyFrame
from protocols.classes import TISSUES
from protocols.findings import DIRECTIONS

N_ANGLE = 36
N_RADIUS = 10


def empty_polar(n_angle: int = N_ANGLE, n_radius: int = N_RADIUS) -> np.ndarray:
    """Zero maps, shape (tissue, direction, angle, radius), canonical orders of TISSUES and DIRECTIONS."""
    return np.zeros((len(TISSUES), len(DIRECTIONS), n_angle, n_radius), dtype=np.float64)


def add_to_polar(
    maps: np.ndarray,
    frame: BodyFrame,
    rows: np.ndarray,
    cols: np.ndarray,
    tissue: int,
    direction: int,
    pixel_area_cm2: float,
) -> None:
    """Add the area of pixels (rows, cols) to ``maps[tissue, direction]`` (in place)."""
    if rows.size == 0:
        return
    n_angle, n_radius = maps.shape[2], maps.shape[3]
    angle, radius = frame.polar(rows, cols)
    a = np.minimum((angle * n_angle / 360.0).astype(np.int64), n_angle - 1)
    r = np.minimum((radius * n_radius).astype(np.int64), n_radius - 1)
    counts = np.bincount(a * n_radius + r, minlength=n_angle * n_radius)
    maps[tissue, direction] += counts.reshape(n_angle, n_radius) * pixel_area_cm2


def polar_key(tissue: str, direction: str) -> str:
    """Key of one map in ``protocols.payloads.PolarMap.maps``."""
    return f"{tissue}:{direction}"


__all__ = ["N_ANGLE", "N_RADIUS", "add_to_polar", "empty_polar", "polar_key"]
