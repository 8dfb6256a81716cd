"""Whole axial CT series: find them in a folder, stack them in HU, reformat, suggest L3.

A hospital exports a whole abdominal CT (hundreds of single-frame files, often several
series mixed in one folder, file names meaningless). This module:

- :func:`scan_folder` lists the CT series in a folder by SeriesInstanceUID (header only, no
  pixel data) and lists every other file as skipped with the reason;
- :func:`order_slices` sorts a series by ImagePositionPatient projected on the slice normal
  (never by file name or InstanceNumber), superior slice first, and measures the slice
  spacing from the positions;
- :func:`load_volume` reads the pixels (through :func:`common.dicom_io.read_ct_slice`, so
  HU, compression and padding are handled the same way as everywhere else) into a
  ``(z, y, x)`` float32 volume with spacing ``(z, y, x)`` in mm;
- :func:`reformat` gives coronal / sagittal images with their pixel size, and
  :func:`square_pixels` resamples them so they are never displayed squashed;
- :func:`suggest_l3` counts vertebral bodies along the spine and suggests the L3 range.
  It is only ever a suggestion: the user confirms it.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from scipy import ndimage, signal

from common.dicom_io import AXIAL_TOLERANCE_DEG, read_ct_slice
from common.errors import SarcofedError

log = logging.getLogger(__name__)

Plane = Literal["axial", "coronal", "sagittal"]


class SeriesError(SarcofedError):
    """A series cannot be stacked into a volume (the message names the file and the fix)."""


@dataclass(frozen=True)
class SliceHeader:
    """What the header of one file says, enough to sort and stack it without pixels."""

    path: Path
    sop_uid: str
    position: tuple[float, float, float] | None
    orientation: tuple[float, float, float, float, float, float] | None
    instance_number: int | None
    slice_location: float | None
    rows: int
    columns: int
    slice_thickness: float | None


@dataclass(frozen=True)
class SeriesInfo:
    """One CT series found in a folder."""

    key: str  #: short stable id (hash of the SeriesInstanceUID), safe in URLs
    series_uid: str
    description: str
    study_uid: str
    slices: tuple[SliceHeader, ...]

    @property
    def count(self) -> int:
        return len(self.slices)


@dataclass(frozen=True)
class SkippedFile:
    path: Path
    reason: str


@dataclass(frozen=True)
class SeriesListing:
    folder: Path
    series: tuple[SeriesInfo, ...]
    skipped: tuple[SkippedFile, ...]

    def get(self, key: str) -> SeriesInfo | None:
        return next((s for s in self.series if s.key == key or s.series_uid == key), None)


@dataclass(frozen=True)
class SliceOrder:
    """Slices sorted superior first; ``positions_mm`` along the slice normal (decreasing)."""

    slices: tuple[SliceHeader, ...]
    positions_mm: tuple[float, ...]
    spacing_mm: float
    uniform: bool
    note: str = ""


@dataclass(frozen=True, eq=False)
class CTVolume:
    """An axial series stacked as HU, index 0 the most superior slice."""

    hu: np.ndarray  #: float32 (z, y, x)
    spacing_mm: tuple[float, float, float]  #: (z, y, x)
    files: tuple[Path, ...]  #: the original file of each z index
    positions_mm: tuple[float, ...]
    series: SeriesInfo
    height_m: float | None = None
    sex: str | None = None
    note: str = ""

    @property
    def shape(self) -> tuple[int, int, int]:
        z, y, x = self.hu.shape
        return int(z), int(y), int(x)


@dataclass(frozen=True, eq=False)
class Reformat:
    """A 2-D image cut from a volume with the size (mm) of its pixels (rows, columns)."""

    image: np.ndarray
    pixel_mm: tuple[float, float]

    @property
    def aspect(self) -> float:
        """Display height / width of one pixel (1.0 means square pixels)."""
        return self.pixel_mm[0] / self.pixel_mm[1]


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


# ------------------------------------------------------------------ scanning


def series_key(series_uid: str) -> str:
    return hashlib.sha1(series_uid.encode()).hexdigest()[:12]


def _floats(value: object, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(math.isfinite(v) for v in out) else None


def _opt_float(value: object) -> float | None:
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _axial_error(orientation: tuple[float, ...] | None) -> str | None:
    if orientation is None:
        return None
    normal = np.cross(orientation[:3], orientation[3:])
    norm = float(np.linalg.norm(normal))
    if norm == 0:
        return "ImageOrientationPatient row and column vectors are parallel"
    tilt = math.degrees(math.acos(min(1.0, abs(float(normal[2])) / norm)))
    if tilt > AXIAL_TOLERANCE_DEG:
        return f"not axial (slice normal {tilt:.0f} degrees from the body axis): a coronal/sagittal series?"
    return None


def _classify(path: Path) -> tuple[tuple[str, str, str, SliceHeader] | None, str | None]:
    """(series uid, description, study uid, header) of a usable CT file, or the skip reason."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        return None, "not a DICOM file (no 'DICM' marker)"
    except Exception as exc:  # any parser failure
        return None, f"DICOM header cannot be read ({type(exc).__name__}: {exc})"
    modality = str(ds.get("Modality", "") or "").strip()
    if modality != "CT":
        return None, f"Modality is {modality or 'missing'}, not CT"
    if not ds.get("Rows") or not ds.get("Columns"):
        return None, "no image (Rows/Columns missing)"
    frames = _opt_float(ds.get("NumberOfFrames")) or 1.0
    if frames > 1:
        return None, f"multi-frame ({int(frames)} frames); export the series as single-frame files"
    orientation = _floats(ds.get("ImageOrientationPatient"), 6)
    problem = _axial_error(orientation)
    if problem:
        return None, problem
    position = _floats(ds.get("ImagePositionPatient"), 3)
    number = _opt_float(ds.get("InstanceNumber"))
    header = SliceHeader(
        path=path,
        sop_uid=str(ds.get("SOPInstanceUID", "") or ""),
        position=position,  # type: ignore[arg-type]
        orientation=orientation,  # type: ignore[arg-type]
        instance_number=int(number) if number is not None else None,
        slice_location=_opt_float(ds.get("SliceLocation")),
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        slice_thickness=_opt_float(ds.get("SliceThickness")),
    )
    uid = str(ds.get("SeriesInstanceUID", "") or "") or f"no-series-uid:{path.parent}"
    return (
        uid,
        str(ds.get("SeriesDescription", "") or ""),
        str(ds.get("StudyInstanceUID", "") or ""),
        header,
    ), None


def _inside(root: Path, path: Path) -> bool:
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    return os.path.commonpath([real_root, real]) == real_root


def scan_folder(folder: Path | str, *, recursive: bool = True) -> SeriesListing:
    """List the axial CT series under ``folder`` (headers only) and every file skipped, with why.

    Symbolic links that lead outside ``folder`` are skipped, never followed.
    """
    root = Path(folder)
    if not root.is_dir():
        raise SeriesError(f"{root}: not a folder; point the workbench at the folder holding the CT files")
    paths = sorted(p for p in (root.rglob("*") if recursive else root.iterdir()) if not p.is_dir())
    groups: dict[str, tuple[str, str, list[SliceHeader]]] = {}
    skipped: list[SkippedFile] = []
    for path in paths:
        if path.name.startswith("."):
            continue
        if not _inside(root, path):
            skipped.append(SkippedFile(path, "symbolic link leads outside the folder; not followed"))
            continue
        found, reason = _classify(path)
        if found is None:
            skipped.append(SkippedFile(path, reason or "unusable"))
            continue
        uid, description, study, header = found
        entry = groups.setdefault(uid, (description, study, []))
        entry[2].append(header)
    series = tuple(
        SeriesInfo(
            key=series_key(uid), series_uid=uid, description=desc, study_uid=study, slices=tuple(headers)
        )
        for uid, (desc, study, headers) in sorted(groups.items(), key=lambda kv: (-len(kv[1][2]), kv[0]))
    )
    log.info("%s: %d CT series, %d files skipped", root, len(series), len(skipped))
    return SeriesListing(folder=root, series=series, skipped=tuple(skipped))


# ------------------------------------------------------------------ ordering


def _normal(slices: Sequence[SliceHeader]) -> np.ndarray:
    for s in slices:
        if s.orientation is not None:
            row, col = np.asarray(s.orientation[:3]), np.asarray(s.orientation[3:])
            n = np.cross(row, col)
            return n / np.linalg.norm(n)
    return np.array([0.0, 0.0, 1.0])


def order_slices(slices: Sequence[SliceHeader]) -> SliceOrder:
    """Sort superior first by ImagePositionPatient along the slice normal; measure spacing.

    Falls back to SliceLocation, then InstanceNumber (with a note) when positions are missing.
    Two slices at the same position raise :class:`SeriesError` naming both files.
    """
    if not slices:
        raise SeriesError("empty series: nothing to sort")
    note = ""
    if all(s.position is not None for s in slices):
        normal = _normal(slices)
        # Orient the normal towards the head (+z in DICOM patient coordinates).
        if normal[2] < 0:
            normal = -normal
        keys = [float(np.dot(normal, s.position)) for s in slices]  # type: ignore[arg-type]
    elif all(s.slice_location is not None for s in slices):
        keys = [float(s.slice_location) for s in slices]  # type: ignore[arg-type]
        note = "no ImagePositionPatient: sorted by SliceLocation"
    else:
        keys = [-float(s.instance_number or 0) for s in slices]
        note = "no slice positions: sorted by InstanceNumber (direction unknown), spacing from SliceThickness"
    order = sorted(range(len(slices)), key=lambda i: -keys[i])
    ordered = tuple(slices[i] for i in order)
    positions = tuple(keys[i] for i in order)
    gaps = -np.diff(np.asarray(positions))
    if gaps.size and float(gaps.min()) < 1e-3:
        i = int(np.argmin(gaps))
        raise SeriesError(
            f"{ordered[i].path} and {ordered[i + 1].path} lie at the same position "
            f"({positions[i]:.2f} mm): two acquisitions in one series? "
            "Pick one and export it as its own series"
        )
    if note.startswith("no slice positions") or not gaps.size:
        thickness = next((s.slice_thickness for s in slices if s.slice_thickness), None)
        spacing = float(thickness) if thickness else 1.0
        return SliceOrder(ordered, positions, spacing, True, note or "one slice: spacing from SliceThickness")
    spacing = float(np.median(gaps))
    uniform = bool(np.all(np.abs(gaps - spacing) <= 0.1 * spacing))
    if not uniform:
        note = (note + "; " if note else "") + (
            f"slice spacing varies ({gaps.min():.2f}-{gaps.max():.2f} mm): missing slices? "
            f"reformats use the median {spacing:.2f} mm"
        )
    return SliceOrder(ordered, positions, spacing, uniform, note)


def load_volume(series: SeriesInfo) -> CTVolume:
    """Read every slice of ``series`` in HU, sorted superior first; raise ``SeriesError`` if unstackable."""
    order = order_slices(series.slices)
    images: list[np.ndarray] = []
    spacing_yx: tuple[float, float] | None = None
    height = sex = None
    for header in order.slices:
        ct = read_ct_slice(header.path)  # SliceError names the file and the reason
        if images and ct.hu.shape != images[0].shape:
            raise SeriesError(
                f"{header.path}: image is {ct.hu.shape[0]}x{ct.hu.shape[1]} but {order.slices[0].path.name} "
                f"is {images[0].shape[0]}x{images[0].shape[1]}; a series must have one image size"
            )
        if spacing_yx is None:
            spacing_yx = ct.spacing_mm
        height, sex = height or ct.height_m, sex or ct.sex
        images.append(ct.hu)
    assert spacing_yx is not None  # order_slices refused an empty series
    volume = np.stack(images).astype(np.float32, copy=False)
    return CTVolume(
        hu=volume,
        spacing_mm=(order.spacing_mm, spacing_yx[0], spacing_yx[1]),
        files=tuple(h.path for h in order.slices),
        positions_mm=order.positions_mm,
        series=series,
        height_m=height,
        sex=sex,
        note=order.note,
    )


# ------------------------------------------------------------------ reformats


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


# ------------------------------------------------------------------ L3 suggestion

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


__all__ = [
    "CTVolume",
    "L3Suggestion",
    "Reformat",
    "SeriesError",
    "SeriesInfo",
    "SeriesListing",
    "SkippedFile",
    "SliceHeader",
    "SliceOrder",
    "Vertebra",
    "load_volume",
    "order_slices",
    "reformat",
    "scan_folder",
    "series_key",
    "square_pixels",
    "suggest_l3",
]
