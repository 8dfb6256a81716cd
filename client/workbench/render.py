"""Server-side rendering of CT views as PNG bytes (the browser draws the label overlay itself)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
from PIL import Image

from common.reformat import Plane, reformat, square_pixels
from common.series import CTVolume


class Preset(StrEnum):
    abdomen = "abdomen"
    bone = "bone"


@dataclass(frozen=True)
class Window:
    width: float
    level: float


PRESETS: dict[Preset, Window] = {
    Preset.abdomen: Window(width=400.0, level=40.0),
    Preset.bone: Window(width=1500.0, level=300.0),
}


def window_to_uint8(hu: np.ndarray, preset: Preset | str) -> np.ndarray:
    """HU mapped through a window preset to 0-255 grey values."""
    try:
        window = PRESETS[Preset(preset)]
    except ValueError:
        valid = ", ".join(p.value for p in Preset)
        raise ValueError(f"unknown window preset {preset!r}; valid presets: {valid}") from None
    low = window.level - window.width / 2
    scaled = (np.asarray(hu, dtype=np.float32) - low) * (255.0 / window.width)
    return np.clip(scaled, 0, 255).astype(np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()


def view_png(volume: CTVolume, plane: Plane, index: int, preset: Preset | str) -> bytes:
    """An axial slice or a coronal / sagittal reformat resampled to square pixels, as PNG."""
    return png_bytes(window_to_uint8(square_pixels(reformat(volume, plane, index)), preset))


def slice_png(hu: np.ndarray, preset: Preset | str) -> bytes:
    """One native axial slice (no resampling: the labelling canvas is pixel-exact)."""
    return png_bytes(window_to_uint8(hu, preset))
