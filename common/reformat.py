"""Multiplanar reformats of a CT volume: axial, coronal and sagittal images with their pixel size.

:func:`reformat` cuts one image from a :class:`common.series.CTVolume` and says how many mm
each of its pixels covers (rows, columns); :func:`square_pixels` resamples such an image so
it is never displayed squashed (coronal/sagittal pixels are usually taller than wide);
:func:`orientation_letters` says which patient direction (A/P/S/I/R/L) each view edge faces. Used
by the site workbench to render its views (``client.workbench.render``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage

from common.series import CTVolume

Plane = Literal["axial", "coronal", "sagittal"]
Side = Literal["top", "bottom", "left", "right"]

#: DICOM patient axes (LPS): +x towards the patient's left, +y posterior, +z superior.
_AXIS_LETTERS = (("R", "L"), ("A", "P"), ("I", "S"))
#: ImageOrientationPatient of a standard axial slice (rows run to the left, columns to the back).
STANDARD_AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


@dataclass(frozen=True, eq=False)
class Reformat:
    """A 2-D image cut from a volume with the size (mm) of its pixels (rows, columns)."""

    image: np.ndarray
    pixel_mm: tuple[float, float]

    @property
    def aspect(self) -> float:
        """Display height / width of one pixel (1.0 means square pixels)."""
        return self.pixel_mm[0] / self.pixel_mm[1]


def reformat(volume: CTVolume, plane: Plane, index: int) -> Reformat:
    """Axial slice ``index``, coronal row ``index`` or sagittal column ``index`` with pixel sizes."""
    dz, dy, dx = volume.spacing_mm
    nz, ny, nx = volume.shape
    limit = {"axial": nz, "coronal": ny, "sagittal": nx}[plane]
    if not 0 <= index < limit:
        raise ValueError(f"{plane} index {index} is outside 0..{limit - 1}")
    if plane == "axial":
        return Reformat(volume.hu[index], (dy, dx))
    if plane == "coronal":
        return Reformat(volume.hu[:, index, :], (dz, dx))
    return Reformat(volume.hu[:, :, index], (dz, dy))


def square_pixels(image: Reformat, *, max_size: int = 1024) -> np.ndarray:
    """Resample so each pixel covers the same mm both ways (bilinear), at most ``max_size`` per side."""
    rows, cols = image.image.shape
    row_mm, col_mm = image.pixel_mm
    pixel = min(row_mm, col_mm)
    out_rows, out_cols = rows * row_mm / pixel, cols * col_mm / pixel
    scale = min(1.0, max_size / max(out_rows, out_cols))
    target = (max(1, round(out_rows * scale)), max(1, round(out_cols * scale)))
    if target == (rows, cols):
        return image.image.copy()
    zoom = (target[0] / rows, target[1] / cols)
    out = ndimage.zoom(image.image, zoom, order=1, mode="nearest", grid_mode=True)
    return out[: target[0], : target[1]].astype(np.float32, copy=False)


def _letter(direction: np.ndarray) -> str:
    """Patient direction (A/P/S/I/R/L) closest to ``direction`` (LPS)."""
    axis = int(np.argmax(np.abs(direction)))
    return _AXIS_LETTERS[axis][1 if direction[axis] > 0 else 0]


def orientation_letters(
    orientation: tuple[float, ...] | None,
) -> dict[Plane, dict[Side, str]]:
    """The patient direction at each edge of the three views :func:`reformat` cuts.

    ``orientation`` is the series' ImageOrientationPatient (row direction, then column
    direction, LPS); ``None`` means a standard axial slice. Volumes are stacked superior
    first, so coronal and sagittal views always have S at the top.
    """
    iop = np.asarray(orientation if orientation is not None else STANDARD_AXIAL, dtype=float)
    along_row, along_column = iop[:3], iop[3:]
    right, bottom = _letter(along_row), _letter(along_column)
    left, top = _letter(-along_row), _letter(-along_column)
    return {
        "axial": {"top": top, "bottom": bottom, "left": left, "right": right},
        "coronal": {"top": "S", "bottom": "I", "left": left, "right": right},
        "sagittal": {"top": "S", "bottom": "I", "left": top, "right": bottom},
    }


__all__ = ["Plane", "Reformat", "orientation_letters", "reformat", "square_pixels"]
