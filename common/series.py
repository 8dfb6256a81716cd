"""An axial CT series: find it in a folder, sort its slices, stack them into a volume in HU.

A hospital exports a whole abdominal CT (hundreds of single-frame files, often several
series mixed in one folder, file names meaningless). This module:

- :func:`scan_folder` lists the CT series in a folder by SeriesInstanceUID (header only, no
  pixel data) and lists every other file as skipped with the reason;
- :func:`order_slices` sorts a series by ImagePositionPatient projected on the slice normal
  (never by file name or InstanceNumber), superior slice first, and measures the slice
  spacing from the positions;
- :func:`load_volume` reads the pixels (through :func:`common.dicom_io.read_ct_slice`, so
  HU, compression and padding are handled the same way as everywhere else) into a
  :class:`CTVolume`: a ``(z, y, x)`` float32 volume with spacing ``(z, y, x)`` in mm.

Used by the site workbench (``client.workbench.state``). Views cut from the volume are in
:mod:`common.reformat`; the L3 suggestion on it is in :mod:`common.l3_suggestion`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from common.dicom_io import AXIAL_TOLERANCE_DEG, read_ct_slice
from common.errors import SarcofedError, SliceError
from common.site_file import require_regular_file
from protocols.classes import ExclusionReason

log = logging.getLogger(__name__)


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
    try:  # a FIFO or device would never end, a huge file is no slice: regular files only
        require_regular_file(path, ExclusionReason.unreadable_image, "file")
    except SliceError as exc:
        return None, exc.detail
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
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            continue  # hidden files and folders (the site's .sarcofed-cache) are not site data
        if not _inside(root, path):
            skipped.append(SkippedFile(path, "symbolic link leads outside the folder; not followed"))
            continue
        if not path.is_file():  # a FIFO, socket or device could block a read
            skipped.append(SkippedFile(path, "not a regular file (FIFO, socket or device); not read"))
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


__all__ = [
    "CTVolume",
    "SeriesError",
    "SeriesInfo",
    "SeriesListing",
    "SkippedFile",
    "SliceHeader",
    "SliceOrder",
    "load_volume",
    "order_slices",
    "scan_folder",
    "series_key",
]
