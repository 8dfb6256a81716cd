"""Read and write a site's 2-D label masks, whatever format the site keeps them in.

``read_mask`` returns the *raw site values* as a 2-D int64 array (rows, columns), oriented
like the DICOM pixel array; ``common.dataset.map_labels`` turns them into canonical classes.
The format is chosen by suffix:

- ``.png``: 8- or 16-bit grayscale (palette PNGs give their palette indices). RGB/RGBA is
  accepted only when the three colour channels are equal everywhere.
- ``.npy``: a 2-D (or HxWx1) array of whole numbers.
- ``.nii`` / ``.nii.gz``: NIfTI stores the first axis as patient x (columns), so sarcofed
  writes the *transposed* array (data[column, row]) with an LPS-flipped affine
  ``diag(-col_mm, -row_mm, 1)``; viewers then show the mask like the DICOM. On reading, a
  file with an orientation (qform/sform code > 0) is first reoriented to that convention
  (so a dcm2niix-style file whose rows run posterior-to-anterior is flipped back); a file
  without one is simply transposed. 2-D and HxWx1 data are accepted.
- ``.tag``: Slice-O-Matic (``common.tagfile``).
- ``.dcm``: DICOM Segmentation. Binary (or fractional, thresholded at half) frames are merged
  into one label image. Pixel value = the segment's label when *every* segment label is a
  plain integer (``"1"``, ``"7"``: the site's own values, as :func:`write_mask` writes them),
  otherwise the segment number. Overlapping segments and a SEG that refers to another image
  than ``ct_path`` (other SOP instance, size or pixel spacing) are refused.

Every failure raises ``SliceError(ExclusionReason.unreadable_label, path, detail)`` (or
``missing_file``): only regular files of a slice's size are read (``common.site_file``), and
``read_mask`` is the boundary for the mask file, so no other exception leaves it. Values must
be whole numbers in 0..``MAX_LABEL_VALUE`` in the file's own type (a ``uint64`` 2**63 is
reported as such, not wrapped to a negative number); complex arrays are refused.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image

from common.errors import SliceError
from common.site_file import check_pixel_count, require_regular_file
from common.tagfile import TagFormatError, read_tag_mask, write_tag
from protocols.classes import ExclusionReason
from protocols.site import MAX_LABEL_VALUE

log = logging.getLogger(__name__)

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
MASK_SUFFIXES: tuple[str, ...] = (".png", ".npy", ".nii", ".nii.gz", ".tag", ".dcm")


def mask_suffix(path: Path) -> str:
    """The format suffix of a mask path (``.nii.gz`` counts as one), lower-cased."""
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return path.suffix.lower()


def _bad(path: Path, detail: str) -> SliceError:
    return SliceError(ExclusionReason.unreadable_label, path, detail)


def _as_label_image(array: np.ndarray, path: Path) -> np.ndarray:
    """Squeeze HxWx1, check 2-D and whole numbers in 0..MAX_LABEL_VALUE, return int64.

    The range is checked in the array's own type, before any conversion: a ``uint64`` value
    2**63 is reported as itself, and a float 1e30 is not wrapped into some other integer.
    """
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim != 2:
        raise _bad(path, f"mask has shape {array.shape}, expected a 2-D rows x columns image")
    check_pixel_count(path, array.shape, ExclusionReason.unreadable_label, "mask")
    if array.dtype == bool:
        return array.astype(np.int64)
    if np.iscomplexobj(array):
        raise _bad(path, f"mask has complex data type {array.dtype}; label values must be whole real numbers")
    if not np.issubdtype(array.dtype, np.number):
        raise _bad(path, f"mask has data type {array.dtype}, expected whole numbers")
    if np.issubdtype(array.dtype, np.floating):
        finite = np.isfinite(array)
        if not finite.all() or not np.array_equal(array, np.rint(array)):
            odd = array[~finite] if not finite.all() else array[array != np.rint(array)]
            raise _bad(
                path, f"mask holds non-integer values (e.g. {float(odd.flat[0])}); label values must be whole"
            )
    if array.size:
        low, high = array.min(), array.max()
        if low < 0:
            raise _bad(path, f"mask holds negative value {low}; label values must be 0 or more")
        if high > MAX_LABEL_VALUE:
            raise _bad(
                path,
                f"mask holds value {high} ({array.dtype}); label values are whole numbers "
                f"0..{MAX_LABEL_VALUE}, one per tissue: is this an image rather than a mask?",
            )
    return array.astype(np.int64)


# ------------------------------------------------------------------ PNG
def _read_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        check_pixel_count(path, image.size, ExclusionReason.unreadable_label, "PNG mask")
        mode = image.mode
        if mode in ("RGB", "RGBA", "LA"):
            data = np.asarray(image)
            colour = data[..., :3] if mode != "LA" else data[..., :1]
            if mode != "LA" and not (
                np.array_equal(colour[..., 0], colour[..., 1])
                and np.array_equal(colour[..., 0], colour[..., 2])
            ):
                raise _bad(
                    path,
                    f"PNG is colour ({mode}) with differing channels; save the mask as 8- or 16-bit "
                    "grayscale where each pixel value is the label value",
                )
            return _as_label_image(colour[..., 0], path)
        if mode not in ("L", "P", "1", "I", "I;16", "I;16B", "I;16L"):
            raise _bad(path, f"PNG mode {mode} is not supported; use 8- or 16-bit grayscale")
        return _as_label_image(np.asarray(image), path)


def _write_png(path: Path, mask: np.ndarray) -> None:
    if mask.size and int(mask.max()) > 65535:
        raise ValueError(f"{path}: PNG holds at most 16 bits; max value {int(mask.max())}")
    if mask.size == 0 or int(mask.max()) <= 255:
        Image.fromarray(mask.astype(np.uint8), mode="L").save(path)
    else:
        Image.fromarray(mask.astype(np.uint16)).save(path)


# ------------------------------------------------------------------ NIfTI
def _read_nifti(path: Path) -> np.ndarray:
    import nibabel as nib
    from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

    image: Any = nib.load(str(path))
    check_pixel_count(path, tuple(image.shape), ExclusionReason.unreadable_label, "NIfTI mask")
    data = np.asanyarray(image.dataobj)
    if data.ndim == 3 and data.shape[2] == 1:
        data = data[:, :, 0]
    if data.ndim != 2:
        raise _bad(path, f"NIfTI data has shape {data.shape}, expected 2-D or HxWx1 (one slice)")
    header = image.header
    oriented = int(header["qform_code"]) > 0 or int(header["sform_code"]) > 0
    if oriented:
        ornt = io_orientation(image.affine)
        transform = ornt_transform(ornt, axcodes2ornt(("L", "P", "S")))
        if not np.array_equal(transform, [[0, 1], [1, 1], [2, 1]]):
            log.info("%s: reorienting NIfTI mask from %s to L,P", path, nib.aff2axcodes(image.affine))
        data = apply_orientation(data[:, :, np.newaxis], transform)[:, :, 0]
    return _as_label_image(np.ascontiguousarray(data.T), path)


def _write_nifti(path: Path, mask: np.ndarray, spacing_mm: tuple[float, float]) -> None:
    import nibabel as nib

    affine = np.diag([-spacing_mm[1], -spacing_mm[0], 1.0, 1.0])
    dtype = np.uint8 if (mask.size == 0 or int(mask.max()) <= 255) else np.uint16
    image = nib.Nifti1Image(np.ascontiguousarray(mask.T[:, :, np.newaxis]).astype(dtype), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, str(path))


# ------------------------------------------------------------------ DICOM SEG
def _segment_values(ds: pydicom.Dataset) -> dict[int, int]:
    labels = {
        int(item.SegmentNumber): str(item.get("SegmentLabel", "")).strip() for item in ds.SegmentSequence
    }
    if labels and all(label.isdigit() for label in labels.values()):
        return {number: int(label) for number, label in labels.items()}
    return {number: number for number in labels}


def _frame_info(ds: pydicom.Dataset, index: int) -> tuple[int | None, str | None]:
    """(segment number, referenced source SOP instance UID) of one frame."""
    groups = []
    if "PerFrameFunctionalGroupsSequence" in ds and index < len(ds.PerFrameFunctionalGroupsSequence):
        groups.append(ds.PerFrameFunctionalGroupsSequence[index])
    if "SharedFunctionalGroupsSequence" in ds:
        groups.append(ds.SharedFunctionalGroupsSequence[0])
    segment: int | None = None
    source: str | None = None
    for group in groups:
        if segment is None and "SegmentIdentificationSequence" in group:
            segment = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        if source is None and "DerivationImageSequence" in group:
            for derivation in group.DerivationImageSequence:
                for item in derivation.get("SourceImageSequence", []):
                    source = str(item.ReferencedSOPInstanceUID)
    return segment, source


def _seg_spacing(ds: pydicom.Dataset) -> tuple[float, float] | None:
    for name in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        if name in ds and "PixelMeasuresSequence" in ds[name][0]:
            spacing = ds[name][0].PixelMeasuresSequence[0].get("PixelSpacing")
            if spacing is not None and len(spacing) == 2:
                return (float(spacing[0]), float(spacing[1]))
    return None


def _quiet_dcmread(path: Path, **kwargs: Any) -> pydicom.Dataset:
    """``pydicom.dcmread`` with its warnings about odd files as debug log lines, not on the screen."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = pydicom.dcmread(path, **kwargs)
    for warning in caught:
        log.debug("%s: pydicom: %s", path, warning.message)
    return ds


def _read_seg(path: Path, ct_path: Path | None) -> np.ndarray:
    ds = _quiet_dcmread(path)
    if str(ds.get("SOPClassUID", "")) != SEGMENTATION_STORAGE and ds.get("Modality") != "SEG":
        raise _bad(
            path,
            f"DICOM file is {ds.get('SOPClassUID', 'of unknown class')!s} (Modality "
            f"{ds.get('Modality', '?')}), expected a Segmentation (SEG)",
        )
    seg_type = str(ds.get("SegmentationType", "BINARY")).upper()
    values = _segment_values(ds)
    check_pixel_count(
        path,
        (int(ds.get("NumberOfFrames", 1) or 1), int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)),
        ExclusionReason.unreadable_label,
        "SEG",
    )
    frames = ds.pixel_array
    if frames.ndim == 2:
        frames = frames[np.newaxis]
    ct_uid: str | None = None
    if ct_path is not None:
        ct = _quiet_dcmread(ct_path, stop_before_pixels=True)
        ct_uid = str(ct.get("SOPInstanceUID", "")) or None
        if (int(ds.Rows), int(ds.Columns)) != (int(ct.Rows), int(ct.Columns)):
            raise _bad(
                path,
                f"SEG is {ds.Rows}x{ds.Columns} but the CT {ct_path.name} is {ct.Rows}x{ct.Columns}: "
                "it was drawn on another image",
            )
        seg_spacing, ct_spacing = _seg_spacing(ds), ct.get("PixelSpacing")
        if (
            seg_spacing
            and ct_spacing
            and not np.allclose(seg_spacing, [float(v) for v in ct_spacing], rtol=1e-3)
        ):
            raise _bad(
                path,
                f"SEG pixel spacing {seg_spacing} mm differs from the CT's {list(ct_spacing)} mm: "
                "it was drawn on another image",
            )
    infos = [_frame_info(ds, i) for i in range(frames.shape[0])]
    sources = {source for _, source in infos if source}
    if ct_uid and sources:
        if ct_uid not in sources:
            raise _bad(
                path,
                f"SEG refers to image(s) {sorted(sources)} but the CT has SOPInstanceUID {ct_uid}: "
                "it was drawn on another image",
            )
        keep = [i for i, (_, source) in enumerate(infos) if source in (None, ct_uid)]
    elif len(sources) > 1:
        raise _bad(path, f"SEG covers {len(sources)} source images; expected one slice (or pass its CT)")
    else:
        keep = list(range(frames.shape[0]))

    label = np.zeros(frames.shape[1:], dtype=np.int64)
    if seg_type == "LABELMAP":
        lookup = {0: 0, **values}
        unknown = sorted(set(np.unique(frames[keep[0]]).tolist()) - set(lookup))
        if unknown:
            raise _bad(
                path, f"LABELMAP SEG holds segment numbers {unknown} that SegmentSequence does not define"
            )
        for number, value in lookup.items():
            label[frames[keep[0]] == number] = value
        return label
    threshold = 1
    if seg_type == "FRACTIONAL":
        threshold = max(1, (int(ds.get("MaximumFractionalValue", 255)) + 1) // 2)
    for i in keep:
        segment = infos[i][0]
        if segment is None or segment not in values:
            raise _bad(path, f"frame {i + 1} names segment {segment}, which SegmentSequence does not define")
        on = frames[i] >= threshold
        clash = on & (label != 0) & (label != values[segment])
        if clash.any():
            raise _bad(
                path,
                f"segments overlap at {int(clash.sum())} pixels (segment {segment} and value "
                f"{int(label[clash][0])}); each pixel must carry one label",
            )
        label[on] = values[segment]
    return label


def _write_seg(path: Path, mask: np.ndarray, ct_path: Path | None) -> None:
    if ct_path is None:
        raise ValueError(f"{path}: writing a DICOM SEG needs the source CT (ct_path=...)")
    import highdicom as hd
    from pydicom.sr.codedict import codes

    source = pydicom.dcmread(ct_path)
    present = [int(v) for v in np.unique(mask) if v != 0]
    if not present:
        raise ValueError(f"{path}: a DICOM SEG needs at least one non-zero value; the mask is empty")
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=str(value),
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for number, value in enumerate(present, start=1)
    ]
    stack = np.stack([mask == value for value in present], axis=-1)[np.newaxis]
    with warnings.catch_warnings():
        # highdicom warns about pseudonymous PatientName values without '^'; harmless here.
        warnings.filterwarnings("ignore", message=".*intended person name.*", category=UserWarning)
        seg = _build_seg(hd, source, stack, descriptions)
    seg.save_as(path)


def _build_seg(hd: Any, source: pydicom.Dataset, stack: np.ndarray, descriptions: list[Any]) -> Any:
    return hd.seg.Segmentation(
        source_images=[source],
        pixel_array=stack.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=100,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="sarcofed",
        manufacturer_model_name="sarcofed",
        software_versions="sarcofed",
        device_serial_number="0",
        omit_empty_frames=False,
    )


# ------------------------------------------------------------------ public API
def _ct_spacing(ct_path: Path | None) -> tuple[float, float]:
    if ct_path is None:
        return (1.0, 1.0)
    ds = pydicom.dcmread(ct_path, stop_before_pixels=True)
    spacing = ds.get("PixelSpacing")
    return (float(spacing[0]), float(spacing[1])) if spacing else (1.0, 1.0)


def read_mask(path: Path | str, *, ct_path: Path | str | None = None) -> np.ndarray:
    """Raw site label values of one 2-D mask, int64 (rows, columns); ``SliceError`` if unusable."""
    path = Path(path)
    ct = Path(ct_path) if ct_path is not None else None
    require_regular_file(path, ExclusionReason.unreadable_label, "mask")
    suffix = mask_suffix(path)
    try:
        if suffix == ".png":
            return _read_png(path)
        if suffix == ".npy":
            return _as_label_image(np.load(path, allow_pickle=False), path)
        if suffix in (".nii", ".nii.gz"):
            return _read_nifti(path)
        if suffix == ".tag":
            return _as_label_image(read_tag_mask(path), path)
        if suffix == ".dcm":
            return _read_seg(path, ct)
    except SliceError:
        raise
    except TagFormatError as exc:
        raise _bad(path, str(exc).removeprefix(f"{path}: ")) from exc
    except Exception as exc:  # every reader failure means "unreadable"
        log.debug("%s: unexpected failure reading the mask", path, exc_info=True)
        raise _bad(path, f"cannot read {suffix} mask: {type(exc).__name__}: {exc}") from exc
    raise _bad(path, f"unknown mask format '{suffix}'; use one of {', '.join(MASK_SUFFIXES)}")


def write_mask(path: Path | str, mask: np.ndarray, *, ct_path: Path | str | None = None) -> Path:
    """Write a 2-D integer mask in the format given by the suffix; return the path.

    ``ct_path`` is required for ``.dcm`` (DICOM SEG, one segment per non-zero value, labelled
    with that value) and gives NIfTI / ``.tag`` files the CT's pixel spacing.
    """
    path = Path(path)
    ct = Path(ct_path) if ct_path is not None else None
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"{path}: mask must be 2-D (rows, columns), got shape {mask.shape}")
    if mask.size and int(mask.min()) < 0:
        raise ValueError(f"{path}: mask values must be 0 or more, got {int(mask.min())}")
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = mask_suffix(path)
    if suffix == ".png":
        _write_png(path, mask)
    elif suffix == ".npy":
        np.save(path, mask)
    elif suffix in (".nii", ".nii.gz"):
        _write_nifti(path, mask, _ct_spacing(ct))
    elif suffix == ".tag":
        write_tag(path, mask, spacing_mm=_ct_spacing(ct))
    elif suffix == ".dcm":
        _write_seg(path, mask, ct)
    else:
        raise ValueError(f"{path}: unknown mask format '{suffix}'; use one of {', '.join(MASK_SUFFIXES)}")
    return path


__all__ = ["MASK_SUFFIXES", "mask_suffix", "read_mask", "write_mask"]
