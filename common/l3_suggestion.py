"""Suggest the L3 slice range of a CT volume by counting vertebral bodies along the spine.

:func:`suggest_l3` takes a :class:`common.series.CTVolume` (superior slice first), finds the
spine in the z-averaged volume, splits the bone-density profile along z at the discs into
vertebral bodies, names them from an anchor (the sacrum at the bottom, or the last
rib-bearing body at the top) and returns an :class:`L3Suggestion`. It is only ever a
suggestion: the user confirms it in the site workbench (``client.workbench.state``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy import ndimage, signal

from common.series import CTVolume


@dataclass(frozen=True)
class Vertebra:
    """One vertebral body found along the spine: slice range (inclusive) and its name."""

    start: int
    end: int
    name: str = "?"


@dataclass(frozen=True)
class L3Suggestion:
    """A *suggested* L3 range (slice indices, inclusive, superior first) and how it was found."""

    start: int | None
    end: int | None
    anchor: Literal["sacrum", "ribs", "none"]
    vertebrae: tuple[Vertebra, ...] = field(default_factory=tuple)
    spine_column: int | None = None
    spine_row: int | None = None
    note: str = ""

    @property
    def found(self) -> bool:
        return self.start is not None and self.end is not None


_LEVELS_ABOVE_SACRUM = ("L5", "L4", "L3", "L2", "L1", "T12", "T11", "T10")


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    labels, n = ndimage.label(flags)
    return [(int(idx[0]), int(idx[-1])) for idx in (np.flatnonzero(labels == k + 1) for k in range(n))]


def _spine_location(volume: CTVolume) -> tuple[int, tuple[int, int]] | None:
    """Midline column and the row range of the vertebral body, from the z-averaged volume.

    Along the midline, from the back: posterior elements (dense in almost every slice), the
    spinal canal (fluid, below 60 HU on average), then the vertebral body (above 60 HU on
    average whether trabecular bone or disc). None when that pattern is not found.
    """
    _nz, _ny, nx = volume.shape
    dy = volume.spacing_mm[1]
    dense = (volume.hu > 250.0).mean(axis=0)
    band = slice(nx // 3, nx - nx // 3)
    weights = dense[:, band].sum(axis=0)
    if weights.sum() <= 0:
        return None
    column = band.start + round(float((weights * np.arange(weights.size)).sum() / weights.sum()))
    cols = slice(max(column - 1, 0), column + 2)
    mean = volume.hu[:, :, cols].mean(axis=(0, 2))
    posterior = [r for r in _runs(dense[:, cols].mean(axis=1) > 0.5) if (r[1] - r[0] + 1) * dy >= 6.0]
    if not posterior:
        return None
    row = posterior[-1][0] - 1
    while row >= 0 and mean[row] >= 60.0 and (posterior[-1][0] - row) * dy < 10.0:
        row -= 1  # partial volume at the edge of the neural arch
    canal_end = row
    while row >= 0 and mean[row] < 60.0 and (canal_end - row) * dy < 35.0:
        row -= 1
    if canal_end - row < 1 or row < 0:
        return None
    body_end = row
    while row >= 0 and mean[row] >= 60.0 and (body_end - row) * dy < 50.0:
        row -= 1
    if (body_end - row) * dy < 12.0:
        return None
    return column, (row + 1, body_end)


def _vertebral_bodies(profile: np.ndarray, low: float, high: float, min_len: int) -> list[tuple[int, int]]:
    """Slice runs of vertebral bodies: the stretches between discs (prominent minima of the profile).

    Within a stretch, the body is the longest run of slices denser than halfway between the
    stretch's upper quartile and its darker bounding disc (partial-volume endplate slices stay out).
    """
    discs, _ = signal.find_peaks(-profile, prominence=max(50.0, 0.2 * (high - low)))
    edges = [-1, *discs.tolist(), profile.size]
    bodies: list[tuple[int, int]] = []
    for left, right in itertools.pairwise(edges):
        segment = profile[left + 1 : right]
        if segment.size < min_len:
            continue
        floor = max(profile[left] if left >= 0 else low, profile[right] if right < profile.size else low)
        runs = _runs(segment > floor + 0.5 * (float(np.percentile(segment, 75)) - floor))
        a, b = max(runs, key=lambda r: r[1] - r[0])
        if b - a + 1 >= min_len:
            bodies.append((left + 1 + a, left + 1 + b))
    return bodies


def suggest_l3(volume: CTVolume) -> L3Suggestion:
    """Suggest the L3 slice range by counting vertebral bodies along the spine.

    Bone density in a small box in the middle of the vertebral body, along z, drops at each
    disc; runs of dense slices are vertebral bodies. The lowest body is taken as the sacrum
    when bone lies far lateral to the spine at its level (iliac wings / sacral ala); L3 is
    then the third body above it. Otherwise the lowest body with bone lateral to it at the
    top of the scan (ribs) is taken as T12 and L3 is the third below it. A heuristic for
    a human to confirm, never a decision.
    """
    nz, ny, nx = volume.shape
    dz, dy, dx = volume.spacing_mm
    if nz < 8:
        return L3Suggestion(None, None, "none", note=f"only {nz} slices: too few to count vertebrae")
    located = _spine_location(volume)
    if located is None:
        return L3Suggestion(
            None, None, "none", note="spine not found (no canal behind a vertebral body); pick L3 by eye"
        )
    column, (top, bottom) = located
    row = (top + bottom) // 2
    half_x = max(1, round(15.0 / dx))
    box = volume.hu[:, top : bottom + 1, max(column - half_x, 0) : column + half_x + 1]
    # The 90th percentile catches cortical bone (shell, endplates), which discs lack.
    profile = np.percentile(box.reshape(nz, -1), 90, axis=1)
    low, high = np.percentile(profile, 5), np.percentile(profile, 70)
    if high - low < 40.0:
        return L3Suggestion(
            None,
            None,
            "none",
            spine_column=column,
            spine_row=row,
            note="no density drop at the discs along the spine; pick L3 by eye",
        )
    bodies = _vertebral_bodies(profile, low, high, max(2, round(12.0 / dz)))
    if len(bodies) < 3:
        return L3Suggestion(
            None,
            None,
            "none",
            spine_column=column,
            spine_row=row,
            note=f"{len(bodies)} vertebral bodies found along the spine; pick L3 by eye",
        )
    # Bone lateral to the spine (beyond the transverse processes) per slice, in mm^2.
    yy, xx = np.ogrid[:ny, :nx]
    lateral = (np.abs(xx - column) * dx > 75.0) & (np.abs(yy - row) * dy < 90.0)
    lateral_mm2 = ((volume.hu > 250.0) & lateral[None]).sum(axis=(1, 2)) * dy * dx

    def has_lateral_bone(a: int, b: int, minimum: float) -> bool:
        return float(np.median(lateral_mm2[a : b + 1])) > minimum

    names: list[str] = ["?"] * len(bodies)
    l3_index: int | None = None
    anchor: Literal["sacrum", "ribs", "none"] = "none"
    if has_lateral_bone(*bodies[-1], 400.0) and bodies[-1][1] >= nz - 2:
        anchor = "sacrum"
        names[-1] = "S1"
        for i, name in enumerate(_LEVELS_ABOVE_SACRUM, start=2):
            if len(bodies) - i >= 0:
                names[-i] = name
        l3_index = len(bodies) - 4 if len(bodies) >= 4 else None
    else:
        ribbed = [i for i, (a, b) in enumerate(bodies[: len(bodies) - 1]) if has_lateral_bone(a, b, 20.0)]
        if ribbed and ribbed[0] == 0:
            t12 = ribbed[-1]
            # stop at the first body without ribs: ribs end at T12
            for i in ribbed:
                if i > 0 and i - 1 not in ribbed:
                    break
                t12 = i
            anchor = "ribs"
            for offset, name in enumerate(("T12", "L1", "L2", "L3", "L4", "L5")):
                if t12 + offset < len(bodies):
                    names[t12 + offset] = name
            l3_index = t12 + 3 if t12 + 3 < len(bodies) else None
    vertebrae = tuple(Vertebra(a, b, n) for (a, b), n in zip(bodies, names, strict=True))
    if l3_index is None or l3_index < 0:
        return L3Suggestion(
            None,
            None,
            "none",
            vertebrae,
            column,
            row,
            note="neither the sacrum nor the lowest rib found to count from; pick L3 by eye",
        )
    start, end = bodies[l3_index]
    how = "third body above the sacrum" if anchor == "sacrum" else "third body below the last rib-bearing one"
    return L3Suggestion(
        start,
        end,
        anchor,
        vertebrae,
        column,
        row,
        note=f"suggested L3: {how} (slices {start}-{end}); check it before use",
    )


__all__ = ["L3Suggestion", "Vertebra", "suggest_l3"]
