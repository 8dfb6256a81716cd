"""Read and write single-frame axial CT DICOM slices in Hounsfield units.

``read_ct_slice`` is the only way sarcofed reads a site's CT image. It either returns a
:class:`CTSlice` (HU as float32, pixel spacing, height and sex when the header has them)
or raises :class:`common.errors.SliceError` with an :class:`ExclusionReason` and a message
that names the file, the offending value and what was expected.

HU = stored value * RescaleSlope + RescaleIntercept, computed in float64 on the values
pydicom decodes (pydicom honours PixelRepresentation, so signed and unsigned storage both
work). Compressed transfer syntaxes are decoded by the pylibjpeg / pyjpegls plugins.

Numbers that no CT scanner makes are refused, not passed on: a pixel spacing outside
:data:`SPACING_RANGE_MM` or a field of view wider than :data:`MAX_FOV_MM` (areas would be
off by orders of magnitude), and HU of which fewer than :data:`MIN_PLAUSIBLE_SHARE` lie in
:data:`PLAUSIBLE_HU` (a wrong RescaleSlope or RescaleIntercept). Only regular files of a
slice's size are read (``common.site_file``); any other failure while interpreting a file
becomes a ``SliceError`` too, so one odd file can never stop a site.

``write_ct_slice`` writes a real CT Image Storage file; tests and the demo hospitals use it.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

from common.errors import SliceError
from common.site_file import check_pixel_count, require_regular_file
from protocols.classes import ExclusionReason

log = logging.getLogger(__name__)

#: Largest angle (degrees) between the image row/column vectors and the patient x/y axes
#: that still counts as an axial slice (gantry tilt is usually well below this).
AXIAL_TOLERANCE_DEG = 10.0

#: HU given to pixels flagged by PixelPaddingValue (outside the scanned field of view).
AIR_HU = -1024.0

#: Pixel spacing (mm) a CT slice may have. 0.05 mm is finer than any clinical CT resolves
#: (ultra-high-resolution scanners reach about 0.15 mm); 20 mm leaves room for small
#: research thumbnails (the demo's 48-pixel slices are about 10 mm). Outside it the value is
#: a unit or header error (micrometres, metres, 1e15) and every area would be wrong.
SPACING_RANGE_MM: tuple[float, float] = (0.05, 20.0)
#: Widest field of view (rows x row spacing, columns x column spacing) in mm: the widest CT
#: bore is about 90 cm, so no reconstruction is wider than a metre.
MAX_FOV_MM = 1000.0
#: HU that real matter takes on a CT slice: air is -1000 (noise reaches about -1100 on
#: low-dose scans) and dense bone and iodine contrast stay below +3071 (the 12-bit scale;
#: 4000 leaves margin). Lower values are padding outside the scanned circle, higher ones metal.
PLAUSIBLE_HU: tuple[float, float] = (-1100.0, 4000.0)
#: Share of a slice's pixels that must lie in PLAUSIBLE_HU. A round field of view covers 79%
#: of the square image (the corners are padding), so a real slice is well above one half; a
#: wrong RescaleSlope (1000 instead of 1) puts almost every pixel outside.
MIN_PLAUSIBLE_SHARE = 0.5

_IMPLEMENTATION_UID = UID("1.2.826.0.1.3680043.8.498.1")  # pydicom's implementation root


@dataclass(frozen=True)
class PatientInfo:
    """Patient module values written by :func:`write_ct_slice` (pseudonymous by default)."""

    patient_id: str = "ANON"
    patient_name: str = "ANON"
    sex: str | None = None
    height_m: float | None = None
    age: str | None = None


@dataclass(frozen=True, eq=False)
class CTSlice:
    """One axial CT slice in Hounsfield units."""

    hu: np.ndarray
    spacing_mm: tuple[float, float]
    height_m: float | None
    sex: str | None
    slice_location: float | None
    path: Path
    sop_instance_uid: str | None = None
    frame_of_reference_uid: str | None = None

    @property
    def pixel_area_cm2(self) -> float:
        """Area of one pixel in cm^2 (row spacing x column spacing)."""
        return self.spacing_mm[0] * self.spacing_mm[1] / 100.0

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.hu.shape[0]), int(self.hu.shape[1]))


def _fail(reason: ExclusionReason, path: Path, detail: str) -> SliceError:
    return SliceError(reason, path, detail)


def _dcmread(path: Path, *, force: bool = False) -> Dataset:
    """``pydicom.dcmread`` with its warnings about odd files turned into debug log lines."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = pydicom.dcmread(path, force=force)
    for warning in caught:
        log.debug("%s: pydicom: %s", path, warning.message)
    return ds


def _read_dataset(path: Path) -> Dataset:
    require_regular_file(path, ExclusionReason.unreadable_image, "image")
    try:
        ds = _dcmread(path)
    except InvalidDicomError:
        ds = None  # maybe a DICOM file without the 128-byte preamble: try once more below
    except Exception as exc:  # any parser failure means "corrupt"
        raise _fail(
            ExclusionReason.unreadable_image, path, f"DICOM header cannot be parsed ({exc}); file corrupt?"
        ) from exc
    if ds is None:
        try:
            ds = _dcmread(path, force=True)
        except Exception as exc:
            raise _fail(
                ExclusionReason.unreadable_image, path, f"not a DICOM file (no 'DICM' marker; {exc})"
            ) from exc
    if "SOPClassUID" not in ds and "Modality" not in ds and "PixelData" not in ds:
        raise _fail(
            ExclusionReason.unreadable_image,
            path,
            "no DICOM image elements could be read (not a DICOM file, or truncated / corrupt)",
        )
    return ds


def _float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _values(ds: Dataset, keyword: str) -> list[Any]:
    """The values of a multi-valued element as a list, however the file stores it.

    A file may hold one value where DICOM asks for several (PixelSpacing "0.7"): pydicom then
    gives a number, not a list. Missing or empty: ``[]``.
    """
    raw = ds.get(keyword)
    if raw is None or raw == "":
        return []
    if isinstance(raw, str | bytes) or not hasattr(raw, "__len__"):
        return [raw]
    return list(raw)


def _angle_to_deg(vector: np.ndarray, axis: np.ndarray) -> float:
    norm = float(np.linalg.norm(vector))
    if norm == 0.0:
        return 90.0
    cos = abs(float(np.dot(vector, axis))) / norm
    return math.degrees(math.acos(min(1.0, cos)))


def _check_axial(ds: Dataset, path: Path) -> None:
    iop = _values(ds, "ImageOrientationPatient")
    if len(iop) != 6:
        shown = f"{len(iop)} value(s), not 6" if iop else "missing"
        log.warning("%s: ImageOrientationPatient %s; assuming an axial slice", path, shown)
        return
    try:
        vec = np.asarray([float(v) for v in iop], dtype=np.float64)
    except (TypeError, ValueError):
        log.warning("%s: unreadable ImageOrientationPatient %r; assuming axial", path, iop)
        return
    row, col = vec[:3], vec[3:]
    # Axial: the row vector lies along patient x and the column vector along patient y
    # (either sign, any in-plane flip); a 90-degree in-plane rotation swaps them.
    straight = max(_angle_to_deg(row, np.array([1.0, 0, 0])), _angle_to_deg(col, np.array([0, 1.0, 0])))
    swapped = max(_angle_to_deg(row, np.array([0, 1.0, 0])), _angle_to_deg(col, np.array([1.0, 0, 0])))
    worst = min(straight, swapped)
    if worst > AXIAL_TOLERANCE_DEG:
        shown = ", ".join(f"{v:g}" for v in vec)
        raise _fail(
            ExclusionReason.not_axial,
            path,
            f"ImageOrientationPatient [{shown}] is {worst:.0f} degrees away from axial "
            f"(at most {AXIAL_TOLERANCE_DEG:g} accepted): export the axial L3 slice, not a reformat",
        )


def _patient_height(ds: Dataset, path: Path) -> float | None:
    height = _float(ds.get("PatientSize"))
    if height is None or height == 0.0:
        return None
    if not 0.5 < height < 2.8:
        log.warning(
            "%s: PatientSize %s is not a height in metres (0.5-2.8 expected); ignoring it", path, height
        )
        return None
    return height


def _patient_sex(ds: Dataset) -> str | None:
    sex = str(ds.get("PatientSex", "") or "").strip().upper()
    return sex if sex in ("M", "F") else None


def _pixel_spacing(ds: Dataset, path: Path) -> tuple[float, float]:
    """(row, column) spacing in mm: two positive numbers in :data:`SPACING_RANGE_MM`."""
    values = _values(ds, "PixelSpacing")
    numbers = [_float(v) for v in values]
    if len(numbers) != 2 or any(v is None or v <= 0 for v in numbers):
        shown = "missing" if not values else f"{[str(v) for v in values]} ({len(values)} value(s))"
        raise _fail(
            ExclusionReason.no_pixel_spacing,
            path,
            f"PixelSpacing is {shown}, expected two positive numbers in mm, row\\column "
            "(areas cannot be computed without it)",
        )
    row_mm, col_mm = float(numbers[0] or 0.0), float(numbers[1] or 0.0)
    low, high = SPACING_RANGE_MM
    if not (low <= row_mm <= high and low <= col_mm <= high):
        raise _fail(
            ExclusionReason.implausible_spacing,
            path,
            f"PixelSpacing is {row_mm:g}\\{col_mm:g} mm, outside {low:g}..{high:g} mm that a CT slice "
            "can have: a unit or header error (micrometres? metres?); every area would be wrong",
        )
    fov = (int(ds.get("Rows", 0) or 0) * row_mm, int(ds.get("Columns", 0) or 0) * col_mm)
    if max(fov) > MAX_FOV_MM:
        raise _fail(
            ExclusionReason.implausible_spacing,
            path,
            f"PixelSpacing {row_mm:g}\\{col_mm:g} mm makes a field of view of "
            f"{fov[0]:.0f} x {fov[1]:.0f} mm, wider than any CT ({MAX_FOV_MM:.0f} mm at most): "
            "is the spacing in the wrong unit?",
        )
    return row_mm, col_mm


def _check_hu(hu: np.ndarray, slope: float, intercept: float, path: Path) -> None:
    """Refuse HU that no CT slice has: most pixels must lie in :data:`PLAUSIBLE_HU`."""
    low, high = PLAUSIBLE_HU
    share = float(np.count_nonzero((hu >= low) & (hu <= high))) / max(hu.size, 1)
    if share >= MIN_PLAUSIBLE_SHARE and bool(np.isfinite(hu).all()):
        return
    median = float(np.median(hu)) if hu.size else float("nan")
    raise _fail(
        ExclusionReason.implausible_hu,
        path,
        f"only {share:.0%} of the pixels lie in {low:g}..{high:g} HU (median {median:.4g} HU) with "
        f"RescaleSlope {slope:g} and RescaleIntercept {intercept:g}; a CT slice is mostly air and "
        "tissue in that range: are the rescale values right?",
    )


def read_ct_slice(path: Path | str) -> CTSlice:
    """Read one single-frame axial CT slice as HU; raise ``SliceError`` if it cannot be used.

    This is the boundary for the image file: whatever goes wrong while reading or
    interpreting it (an odd header pydicom accepts, a value of an unexpected type) becomes
    ``SliceError(unreadable_image)`` naming the file.
    """
    path = Path(path)
    ds = _read_dataset(path)
    try:
        return _interpret(ds, path)
    except SliceError:
        raise
    except Exception as exc:
        log.debug("%s: unexpected failure interpreting the CT slice", path, exc_info=True)
        raise _fail(
            ExclusionReason.unreadable_image,
            path,
            f"DICOM header cannot be interpreted ({type(exc).__name__}: {exc})",
        ) from exc


def _interpret(ds: Dataset, path: Path) -> CTSlice:
    modality = str(ds.get("Modality", "") or "").strip()
    if modality != "CT":
        shown = f"'{modality}'" if modality else "missing"
        raise _fail(ExclusionReason.not_ct, path, f"Modality is {shown}, expected 'CT'")
    frames_raw = ds.get("NumberOfFrames")
    frames = _float(frames_raw) if frames_raw not in (None, "") else 1.0
    if frames is None:
        raise _fail(ExclusionReason.unreadable_image, path, f"NumberOfFrames {frames_raw!r} is not a number")
    if frames > 1:
        raise _fail(
            ExclusionReason.multi_frame,
            path,
            f"NumberOfFrames is {int(frames)}, expected 1: export the L3 slice as its own single-frame file",
        )
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise _fail(ExclusionReason.no_pixel_data, path, "the file has no PixelData element")
    spacing = _pixel_spacing(ds, path)
    _check_axial(ds, path)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1:
        raise _fail(
            ExclusionReason.unreadable_image,
            path,
            f"SamplesPerPixel is {samples} ({ds.get('PhotometricInterpretation', '?')}), "
            "expected 1 (a grayscale CT image)",
        )
    shape = (int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0))
    check_pixel_count(path, shape, ExclusionReason.unreadable_image, "image")
    try:
        stored = ds.pixel_array
    except Exception as exc:  # decoder errors come in many types
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        codec = f"{syntax.name} ({syntax})" if syntax is not None else "unknown transfer syntax"
        raise _fail(
            ExclusionReason.unreadable_image,
            path,
            f"pixel data cannot be decoded with transfer syntax {codec}: {exc}",
        ) from exc
    if stored.ndim != 2:
        raise _fail(
            ExclusionReason.unreadable_image,
            path,
            f"decoded pixel array has shape {stored.shape}, expected a 2-D rows x columns image",
        )

    slope = _float(ds.get("RescaleSlope"))
    intercept = _float(ds.get("RescaleIntercept"))
    if slope is None or slope == 0.0:
        if "RescaleSlope" in ds:
            log.warning("%s: RescaleSlope %r unusable; using 1", path, ds.get("RescaleSlope"))
        slope = 1.0
    if intercept is None:
        if "RescaleIntercept" not in ds:
            log.warning("%s: no RescaleIntercept; assuming stored values are already HU", path)
        intercept = 0.0
    hu = (stored.astype(np.float64) * slope + intercept).astype(np.float32)
    padding = _float(ds.get("PixelPaddingValue"))
    if padding is not None:
        # Pixels outside the scanned field of view: air, not the -3000 HU they would decode to.
        hu[stored == padding] = AIR_HU
    _check_hu(hu, slope, intercept, path)

    position = _values(ds, "ImagePositionPatient")
    z = _float(position[2]) if len(position) == 3 else None
    if z is None:
        z = _float(ds.get("SliceLocation"))
    uid = ds.get("SOPInstanceUID")
    frame_uid = ds.get("FrameOfReferenceUID")
    return CTSlice(
        hu=hu,
        spacing_mm=spacing,
        height_m=_patient_height(ds, path),
        sex=_patient_sex(ds),
        slice_location=z,
        path=path,
        sop_instance_uid=str(uid) if uid else None,
        frame_of_reference_uid=str(frame_uid) if frame_uid else None,
    )


def _bits_stored(stored: np.ndarray, signed: bool) -> int:
    """Smallest BitsStored in 12..16 that holds every stored value."""
    lo, hi = (int(stored.min()), int(stored.max())) if stored.size else (0, 0)
    for bits in range(12, 17):
        if signed and -(2 ** (bits - 1)) <= lo and hi < 2 ** (bits - 1):
            return bits
        if not signed and hi < 2**bits:
            return bits
    return 16


def write_ct_slice(
    path: Path | str,
    hu: np.ndarray,
    *,
    spacing_mm: tuple[float, float],
    signed: bool = True,
    slope: float = 1.0,
    intercept: float = -1024.0,
    patient: PatientInfo | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    position_z: float = 0.0,
    instance_number: int = 1,
    transfer_syntax: str | None = None,
    series_description: str = "",
    extra: dict[str, Any] | None = None,
    frame_of_reference_uid: str | None = None,
    slice_thickness_mm: float = 1.0,
) -> Path:
    """Write ``hu`` (2-D) as a single-frame axial CT Image Storage file and return its path.

    Stored = round((hu - intercept) / slope), clipped to int16 (``signed``) or uint16.
    ``transfer_syntax`` defaults to Explicit VR Little Endian; any syntax pydicom can
    encode (RLE Lossless, JPEG-LS / JPEG 2000 lossless) is compressed with
    ``Dataset.compress``. ``extra`` sets further elements by keyword (e.g. ``{"Modality": "MR"}``).
    """
    path = Path(path)
    hu = np.asarray(hu, dtype=np.float64)
    if hu.ndim != 2:
        raise ValueError(f"hu must be a 2-D rows x columns array, got shape {hu.shape}")
    if slope == 0:
        raise ValueError("slope must not be 0")
    info = patient or PatientInfo()
    limits = (-32768, 32767) if signed else (0, 65535)
    stored = np.clip(np.rint((hu - intercept) / slope), *limits)
    pixels = stored.astype(np.int16 if signed else np.uint16)
    bits = _bits_stored(pixels, signed)
    syntax = UID(transfer_syntax) if transfer_syntax else ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = UID(sop_uid) if sop_uid else generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = _IMPLEMENTATION_UID
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    now = datetime(2000, 1, 1)  # a fixed, non-identifying date
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.FrameOfReferenceUID = frame_of_reference_uid or generate_uid()
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Manufacturer = "sarcofed"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = int(instance_number)
    ds.SeriesDescription = series_description
    ds.PatientID = info.patient_id
    ds.PatientName = info.patient_name
    ds.PatientBirthDate = ""
    ds.PatientSex = info.sex or ""
    if info.height_m is not None:
        ds.PatientSize = f"{info.height_m:.2f}"
    if info.age is not None:
        ds.PatientAge = info.age
    ds.PatientPosition = "FFS"
    ds.KVP = "120"
    ds.SliceThickness = f"{slice_thickness_mm:g}"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    rows, cols = pixels.shape
    ds.ImagePositionPatient = [
        f"{-cols * spacing_mm[1] / 2:.4f}",
        f"{-rows * spacing_mm[0] / 2:.4f}",
        f"{position_z:.4f}",
    ]
    ds.SliceLocation = f"{position_z:.4f}"
    ds.PixelSpacing = [f"{spacing_mm[0]:.6g}", f"{spacing_mm[1]:.6g}"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.RescaleSlope = f"{slope:g}"
    ds.RescaleIntercept = f"{intercept:g}"
    ds.RescaleType = "HU"
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.PixelData = pixels.tobytes()
    for keyword, value in (extra or {}).items():
        setattr(ds, keyword, value)
    if syntax != ExplicitVRLittleEndian:
        if syntax.is_compressed:
            ds.compress(syntax, pixels, generate_instance_uid=False)
        else:
            ds.file_meta.TransferSyntaxUID = syntax
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


__all__ = [
    "AIR_HU",
    "AXIAL_TOLERANCE_DEG",
    "MAX_FOV_MM",
    "MIN_PLAUSIBLE_SHARE",
    "PLAUSIBLE_HU",
    "SPACING_RANGE_MM",
    "CTSlice",
    "PatientInfo",
    "RLELossless",
    "read_ct_slice",
    "write_ct_slice",
]
