"""Slice-O-Matic ``.tag`` label files.

Layout: an ASCII header of ``key:value`` tokens (``x: 512 y: 512 z: 1 type:BYTE org_x:...``,
on one or several lines, spaces allowed after the colon) that ends at the FIRST form-feed
byte (0x0C), followed by x*y*z unsigned bytes, rows top to bottom (the same orientation as
the DICOM pixel array). The header length found by the 0x0C must equal the file size minus
x*y*z; anything else (truncated data, trailing bytes, a 0x0C inside a broken header) is
refused rather than guessed at.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORM_FEED = 0x0C
#: Header length (bytes, including the 0x0C) that :func:`write_tag` pads to.
HEADER_PAD = 512
_TOKEN = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*:\s*(\S+)")


class TagFormatError(ValueError):
    """The file is not a valid Slice-O-Matic ``.tag`` file (message says why)."""


@dataclass(frozen=True, eq=False)
class TagFile:
    """A decoded ``.tag`` file: ``array`` is (y, x) for z == 1, else (z, y, x), uint8."""

    array: np.ndarray
    header: dict[str, str] = field(default_factory=dict)
    header_length: int = 0


def _int_field(header: dict[str, str], key: str, path: Path, default: int | None = None) -> int:
    if key not in header:
        if default is not None:
            return default
        raise TagFormatError(f"{path}: header has no '{key}:' entry (image {key}-size is required)")
    try:
        value = int(float(header[key]))
    except ValueError:
        raise TagFormatError(f"{path}: header '{key}:{header[key]}' is not a whole number") from None
    if value < 1:
        raise TagFormatError(f"{path}: header '{key}:{value}' must be at least 1")
    return value


def parse_header(text: str) -> dict[str, str]:
    """``key:value`` tokens of a header (later duplicates win); keys are lower-cased."""
    return {key.lower(): value for key, value in _TOKEN.findall(text)}


def read_tag(path: Path | str, *, require_2d: bool = False) -> TagFile:
    """Read a ``.tag`` file; raise :class:`TagFormatError` naming what is wrong."""
    path = Path(path)
    blob = path.read_bytes()
    end = blob.find(bytes([FORM_FEED]))
    if end < 0:
        raise TagFormatError(
            f"{path}: no form-feed byte (0x0C) ends the header; not a Slice-O-Matic .tag file"
        )
    header_length = end + 1
    header = parse_header(blob[:end].decode("latin-1"))
    x = _int_field(header, "x", path)
    y = _int_field(header, "y", path)
    z = _int_field(header, "z", path, default=1)
    kind = header.get("type", "BYTE").upper()
    if kind != "BYTE":
        raise TagFormatError(f"{path}: header 'type:{header['type']}', expected 'type:BYTE' (8-bit labels)")
    if require_2d and z != 1:
        raise TagFormatError(f"{path}: header 'z:{z}', expected z:1 for a single 2-D slice")
    n_pixels = x * y * z
    expected_header = len(blob) - n_pixels
    if expected_header != header_length:
        if expected_header < header_length:
            what = f"{header_length - expected_header} bytes short (truncated?)"
        else:
            what = f"{expected_header - header_length} bytes too long (trailing data?)"
        raise TagFormatError(
            f"{path}: header ends at byte {header_length} (first 0x0C) but file size {len(blob)} minus "
            f"x*y*z = {x}*{y}*{z} = {n_pixels} gives {expected_header}: pixel data is {what}"
        )
    data = np.frombuffer(blob, dtype=np.uint8, offset=header_length).copy()
    array = data.reshape((y, x)) if z == 1 else data.reshape((z, y, x))
    return TagFile(array=array, header=header, header_length=header_length)


def read_tag_mask(path: Path | str) -> np.ndarray:
    """The 2-D (rows, columns) uint8 label image of a single-slice ``.tag`` file."""
    return read_tag(path, require_2d=True).array


def format_header(
    shape: tuple[int, int],
    *,
    spacing_mm: tuple[float, float] = (1.0, 1.0),
    origin_mm: tuple[float, float, float] = (0.0, 0.0, 0.0),
    pad_to: int = HEADER_PAD,
) -> bytes:
    """A Slice-O-Matic-like header for a (rows, columns) slice, space-padded, ending in 0x0C."""
    rows, cols = shape
    text = (
        f"x: {cols} y: {rows} z: 1 type:BYTE "
        f"org_x: {origin_mm[0]:g} org_y: {origin_mm[1]:g} org_z: {origin_mm[2]:g} "
        f"inc_x: {spacing_mm[1]:g} inc_y: {spacing_mm[0]:g} inc_z: 1 "
        "dir_x_1: 1 dir_x_2: 0 dir_x_3: 0 dir_y_1: 0 dir_y_2: 1 dir_y_3: 0 "
        "dir_z_1: 0 dir_z_2: 0 dir_z_3: 1 "
    ).encode("ascii")
    padding = max(0, pad_to - len(text) - 1)
    return text + b" " * padding + bytes([FORM_FEED])


def write_tag(
    path: Path | str,
    mask: np.ndarray,
    *,
    spacing_mm: tuple[float, float] = (1.0, 1.0),
    origin_mm: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> Path:
    """Write a 2-D mask (values 0..255) as a single-slice ``.tag`` file; return the path."""
    path = Path(path)
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"{path}: a .tag slice needs a 2-D mask, got shape {mask.shape}")
    if mask.size and (int(mask.min()) < 0 or int(mask.max()) > 255):
        raise ValueError(
            f"{path}: .tag stores bytes; mask values {int(mask.min())}..{int(mask.max())} do not fit 0..255"
        )
    header = format_header(mask.shape, spacing_mm=spacing_mm, origin_mm=origin_mm)
    path.write_bytes(header + np.ascontiguousarray(mask, dtype=np.uint8).tobytes())
    return path


__all__ = [
    "FORM_FEED",
    "TagFile",
    "TagFormatError",
    "format_header",
    "parse_header",
    "read_tag",
    "read_tag_mask",
    "write_tag",
]
