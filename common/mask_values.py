"""Every raw value of a site's masks, described from the images before any mapping.

For each integer value found in a site's masks, pooled over slices (counts and sums only,
nothing per slice): how many pixels, their share in each of the label protocol's HU ranges
and their mean HU, and where they lie on the slice: outside the body outline, under the
skin (a thin band inside the outline), around the spine (the body frame's psoas and
paraspinal regions, ``common.discrepancy.frame``) and touching another value's pixels.
:class:`LabelValueAccumulator` folds slices into :class:`ValueStats`;
``common.label_guess`` decides from them what each value is. Callers: ``common.check``
(``site check``) and ``client.site_init`` (``site init``). Everything here stays at the site.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Final

import numpy as np
from pydantic import Field
from scipy import ndimage

from common.discrepancy.frame import (
    BODY_HU,
    PARASPINAL,
    PSOAS,
    BodyFrame,
    body_frame,
    fill_holes,
    largest_component,
)
from protocols.base import Schema
from protocols.protocol import ALBERTA, LabelProtocol

log = logging.getLogger(__name__)

#: The band under the skin: this share of the body's equivalent radius (at least one pixel).
SKIN_FRACTION: Final = 0.06
#: More distinct values than this in one slice: the rest are pooled for HU but not for touching.
MAX_TOUCH_VALUES: Final = 16
#: More distinct values than this in one mask: not a label mask (an image?); the slice is skipped.
MAX_VALUES: Final = 64


class ValueStats(Schema):
    """One raw mask value, pooled over the pixels of every slice it occurs in."""

    value: int
    pixels: int
    slices: int
    share_muscle_hu: float
    share_subcutaneous_fat_hu: float
    share_visceral_fat_hu: float
    mean_hu: float
    share_outside_body: float
    share_under_skin: float
    #: share beside or behind the spine (the body frame's psoas and paraspinal regions), over the
    #: slices where a spine was found; None when it never was
    share_around_spine: float | None = None
    #: other value -> share of this value's pixels that touch it (8-neighbourhood)
    touching: dict[int, float] = Field(default_factory=dict)


@dataclass
class _Sums:
    pixels: int = 0
    slices: int = 0
    in_muscle: int = 0
    in_sat: int = 0
    in_vat: int = 0
    hu_sum: float = 0.0
    outside: int = 0
    skin: int = 0
    spine: int = 0
    spine_known: int = 0
    touching: dict[int, int] = field(default_factory=dict)


def _frame(hu: np.ndarray, spacing: tuple[float, float]) -> BodyFrame | None:
    try:
        return body_frame(hu, spacing)
    except ValueError:  # no body at all
        return None
    except Exception:  # the frame only places pixels; the outline alone will do
        log.exception("body frame failed; using the body outline only")
        return None


def _outline(hu: np.ndarray) -> np.ndarray:
    """The body outline as the body frame draws it (HU > -500, largest component, holes filled)."""
    return fill_holes(largest_component(hu > BODY_HU))


def _around_spine(frame: BodyFrame, shape: tuple[int, int]) -> np.ndarray:
    """Pixels in the body frame's psoas or paraspinal region (beside and behind the spine)."""
    rows, cols = np.nonzero(frame.body)
    codes = frame.regions(rows, cols)
    out = np.zeros(shape, dtype=bool)
    out[rows, cols] = (codes == PSOAS) | (codes == PARASPINAL)
    return out


@dataclass
class LabelValueAccumulator:
    """Pooled pixel counts per raw mask value over a site's slices."""

    protocol: LabelProtocol = ALBERTA
    sums: dict[int, _Sums] = field(default_factory=dict)
    n_slices: int = 0
    #: slices left out: a mask with more than MAX_VALUES distinct values, or HU not all finite
    n_skipped: int = 0

    def add(
        self,
        hu: np.ndarray,
        spacing_mm: tuple[float, float],
        raw: np.ndarray,
        *,
        frame: BodyFrame | None = None,
    ) -> None:
        """Add one slice: its HU image, pixel spacing (row, col mm) and raw mask (before mapping).

        ``frame``: the slice's body frame when the caller has it (else it is built here).
        """
        if hu.shape != raw.shape or hu.ndim != 2:
            raise ValueError(f"hu and mask must be 2-D of one shape, got {hu.shape} and {raw.shape}")
        values, inverse = np.unique(raw, return_inverse=True)
        if len(values) > MAX_VALUES or not np.isfinite(hu).all():
            self.n_skipped += 1
            return
        self.n_slices += 1
        inverse = inverse.reshape(raw.shape)
        if not np.any(values != 0):
            return
        spacing = (float(spacing_mm[0]), float(spacing_mm[1]))
        frame = frame if frame is not None else _frame(hu, spacing)
        body = frame.body if frame is not None else _outline(hu)
        spine_found = frame is not None and frame.spine_found
        ranges = self.protocol.hu_ranges
        n = len(values)

        def count(where: np.ndarray) -> np.ndarray:
            return np.bincount(inverse[where], minlength=n)

        totals = np.bincount(inverse.ravel(), minlength=n)
        in_muscle = count((hu >= ranges.muscle[0]) & (hu <= ranges.muscle[1]))
        in_sat = count((hu >= ranges.subcutaneous_fat[0]) & (hu <= ranges.subcutaneous_fat[1]))
        in_vat = count((hu >= ranges.visceral_fat[0]) & (hu <= ranges.visceral_fat[1]))
        hu_sum = np.bincount(inverse.ravel(), weights=hu.ravel().astype(np.float64), minlength=n)
        outside = count(~body)
        skin = count(self._skin_band(body, spacing))
        spine = count(_around_spine(frame, hu.shape)) if frame is not None and spine_found else None
        tracked = [i for i in np.argsort(-totals) if values[i] != 0][:MAX_TOUCH_VALUES]
        touch: dict[int, np.ndarray] = {}
        square = np.ones((3, 3), dtype=bool)
        for i in tracked:
            near = ndimage.binary_dilation(inverse == i, square)
            touch[int(values[i])] = count(near)
        for i, value in enumerate(values.tolist()):
            if value == 0:
                continue
            sums = self.sums.setdefault(int(value), _Sums())
            sums.pixels += int(totals[i])
            sums.slices += 1
            sums.in_muscle += int(in_muscle[i])
            sums.in_sat += int(in_sat[i])
            sums.in_vat += int(in_vat[i])
            sums.hu_sum += float(hu_sum[i])
            sums.outside += int(outside[i])
            sums.skin += int(skin[i])
            if spine is not None:
                sums.spine += int(spine[i])
                sums.spine_known += int(totals[i])
            for other, counts in touch.items():
                if other != value:
                    sums.touching[other] = sums.touching.get(other, 0) + int(counts[i])

    @staticmethod
    def _skin_band(body: np.ndarray, spacing: tuple[float, float]) -> np.ndarray:
        if not body.any():
            return body
        radius_mm = math.sqrt(float(body.sum()) * spacing[0] * spacing[1] / math.pi)
        depth = ndimage.distance_transform_edt(np.pad(body, 1), sampling=spacing)[1:-1, 1:-1]
        return body & (depth <= max(SKIN_FRACTION * radius_mm, max(spacing)))

    def finalise(self) -> tuple[ValueStats, ...]:
        out = []
        for value in sorted(self.sums):
            s = self.sums[value]
            n = max(s.pixels, 1)
            out.append(
                ValueStats(
                    value=value,
                    pixels=s.pixels,
                    slices=s.slices,
                    share_muscle_hu=s.in_muscle / n,
                    share_subcutaneous_fat_hu=s.in_sat / n,
                    share_visceral_fat_hu=s.in_vat / n,
                    mean_hu=s.hu_sum / n,
                    share_outside_body=s.outside / n,
                    share_under_skin=s.skin / n,
                    share_around_spine=s.spine / s.spine_known if s.spine_known else None,
                    touching={k: v / n for k, v in sorted(s.touching.items()) if v},
                )
            )
        return tuple(out)


__all__ = ["MAX_VALUES", "LabelValueAccumulator", "ValueStats"]
