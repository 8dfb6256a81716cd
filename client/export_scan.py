"""What a hospital's export folder holds: CT slices paired with their masks, and what is left over.

:func:`scan_export` reads headers only (never pixels) and pairs each mask with its CT image:

- Slice-O-Matic: ``IMG0001.dcm`` + ``IMG0001.tag`` or ``IMG0001.dcm.tag``;
- masks named after their image (``.nii``, ``.nii.gz``, ``.png``, ``.npy``): ``X.dcm`` +
  ``X.nii.gz`` / ``X.dcm.png`` / ``X_mask.png`` ..., in the same folder or, when the name is
  unique in the export, anywhere in it (``images/X.dcm`` + ``labels/X.png``);
- DICOM SEG objects by the SOPInstanceUID they reference, whatever their file names; a
  SEG that covers several slices pairs with each of them.

Every file that ends up in no pair is listed with the reason. CT series of which no slice
has a mask are returned whole (for the workbench, ``client.site_init``). The CT side is
``common.series.scan_folder`` (axial single-frame CT only, symbolic links leading out of
the folder not followed, regular files only). Called by ``client.site_init``.
"""

from __future__ import annotations

import logging
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pydicom

from common.masks import SEGMENTATION_STORAGE, mask_suffix
from common.series import SeriesInfo, SliceHeader, scan_folder

log = logging.getLogger(__name__)

#: Mask formats paired by file name (DICOM SEG is paired by reference).
NAMED_MASKS: Final = (".tag", ".nii", ".nii.gz", ".png", ".npy")
#: Decorations a mask name may add to its image's name (``X_mask.png``).
_DECORATION: Final = re.compile(r"[._-](mask|masks|label|labels|seg|segmentation|tag)$", re.IGNORECASE)


@dataclass(frozen=True)
class Pair:
    """One CT slice and its mask; ``how`` says how they were paired."""

    image: SliceHeader
    mask: Path
    how: str


@dataclass(frozen=True)
class Unpaired:
    """A file that is in no pair, and why."""

    path: Path
    reason: str
    #: what is particular to this file (the image it would pair with, the UID it references):
    #: kept out of ``reason`` so that files with the same problem are listed together
    detail: str = ""


@dataclass(frozen=True)
class ExportScan:
    """The pairs, the files left over, and the CT series that have no mask at all."""

    source: Path
    pairs: tuple[Pair, ...]
    unpaired: tuple[Unpaired, ...]
    unlabelled_series: tuple[SeriesInfo, ...]


def _keys(name: str) -> list[str]:
    """Names an image may have, from a mask's name without its suffix (``IMG1.dcm`` -> IMG1.dcm, IMG1)."""
    keys = [name]
    undecorated = _DECORATION.sub("", name)
    if undecorated != name:
        keys.append(undecorated)
    for key in list(keys):
        if key.lower().endswith(".dcm"):
            keys.append(key[:-4])
    return [k.lower() for k in dict.fromkeys(keys)]


def _image_keys(path: Path) -> list[str]:
    keys = [path.name]
    if path.suffix.lower() == ".dcm":
        keys.append(path.name[:-4])
    return [k.lower() for k in keys]


def _referenced_uids(ds: pydicom.Dataset) -> list[str]:
    """SOPInstanceUIDs a SEG says it was drawn on (referenced series, then per-frame sources)."""
    uids: list[str] = []
    for series in ds.get("ReferencedSeriesSequence", []):
        for item in series.get("ReferencedInstanceSequence", []):
            uids.append(str(item.get("ReferencedSOPInstanceUID", "")))
    for group in ds.get("PerFrameFunctionalGroupsSequence", []):
        for derivation in group.get("DerivationImageSequence", []):
            for item in derivation.get("SourceImageSequence", []):
                uids.append(str(item.get("ReferencedSOPInstanceUID", "")))
    return [u for u in dict.fromkeys(uids) if u]


def _seg_references(path: Path) -> list[str] | None:
    """SOPInstanceUIDs a DICOM SEG file references; None when the file is not a readable SEG."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:  # not DICOM, or a header pydicom cannot parse: scan_folder said why
        return None
    if str(ds.get("SOPClassUID", "")) != SEGMENTATION_STORAGE and ds.get("Modality") != "SEG":
        return None
    return _referenced_uids(ds)


def _other_reason(reason: str) -> str:
    if reason.startswith("not a DICOM file"):
        return f"neither DICOM nor a mask sarcofed pairs ({', '.join(NAMED_MASKS)}, DICOM SEG)"
    return reason


def scan_export(source: Path | str, *, skip: Path | None = None) -> ExportScan:
    """Pair the CT slices and masks under ``source`` (headers only); ``skip``: a folder to ignore."""
    root = Path(source)
    listing = scan_folder(root)
    skip_real = os.path.realpath(skip) if skip is not None else None

    def skipped_here(path: Path) -> bool:
        if skip_real is None:
            return False
        real = os.path.realpath(path)
        return os.path.commonpath([skip_real, real]) == skip_real

    images: list[SliceHeader] = [h for s in listing.series for h in s.slices if not skipped_here(h.path)]
    by_key: dict[str, list[SliceHeader]] = defaultdict(list)
    for header in images:
        for key in _image_keys(header.path):
            by_key[key].append(header)
    by_uid = {h.sop_uid: h for h in images if h.sop_uid}

    pairs: list[Pair] = []
    unpaired: list[Unpaired] = []
    taken: dict[Path, Path] = {}

    def pair(image: SliceHeader, mask: Path, how: str) -> None:
        if image.path in taken:
            unpaired.append(
                Unpaired(
                    mask,
                    "a second mask for an image that already has one (the first by name is used)",
                    f"{image.path.name} has {taken[image.path].name}",
                )
            )
            return
        taken[image.path] = mask
        pairs.append(Pair(image, mask, how))

    # the plainest name first: IMG1.tag pairs before IMG1.dcm.tag, which is then "a second mask"
    for skipped in sorted(listing.skipped, key=lambda s: (str(s.path.parent), len(s.path.name), s.path.name)):
        path = skipped.path
        if skipped_here(path):
            continue
        suffix = mask_suffix(path)
        if suffix in NAMED_MASKS and path.is_file():
            stem = path.name[: -len(suffix)]
            candidates = [h for key in _keys(stem) for h in by_key.get(key, [])]
            candidates = list({h.path: h for h in candidates}.values())
            near = [h for h in candidates if h.path.parent == path.parent]
            chosen = near if near else candidates
            how = "Slice-O-Matic .tag by name" if suffix == ".tag" else f"{suffix} mask by name"
            if len(chosen) == 1:
                pair(chosen[0], path, how)
            elif not chosen:
                unpaired.append(
                    Unpaired(
                        path,
                        "mask with no CT image of the same name in the export",
                        f"no {stem}.dcm or {stem}",
                    )
                )
            else:
                names = ", ".join(str(h.path.relative_to(root)) for h in chosen[:3])
                unpaired.append(Unpaired(path, "mask name fits several CT images; rename one", names))
            continue
        uids = _seg_references(path) if path.is_file() else None
        if uids is None:
            unpaired.append(Unpaired(path, _other_reason(skipped.reason)))
            continue
        found = [by_uid[u] for u in uids if u in by_uid]
        if not uids:
            unpaired.append(Unpaired(path, "DICOM SEG that references no SOPInstanceUID; cannot find its CT"))
        elif not found:
            unpaired.append(
                Unpaired(
                    path,
                    "DICOM SEG drawn on a CT image (SOPInstanceUID) which no CT file in the export has",
                    f"{uids[0]}" + (f" and {len(uids) - 1} more" if len(uids) > 1 else ""),
                )
            )
        for header in found:
            pair(header, path, "DICOM SEG by referenced SOPInstanceUID")

    unlabelled: list[SeriesInfo] = []
    for series in listing.series:
        slices = [h for h in series.slices if not skipped_here(h.path)]
        if not slices:
            continue
        if not any(h.path in taken for h in slices) and len(slices) > 1:
            unlabelled.append(series)
            continue
        for header in slices:
            if header.path not in taken:
                unpaired.append(
                    Unpaired(
                        header.path,
                        "CT image with no mask: no .tag/.nii(.gz)/.png/.npy of its name, no DICOM SEG "
                        "referencing its SOPInstanceUID",
                    )
                )
    log.info(
        "%s: %d pairs, %d files unpaired, %d series without masks",
        root,
        len(pairs),
        len(unpaired),
        len(unlabelled),
    )
    return ExportScan(
        source=root,
        pairs=tuple(sorted(pairs, key=lambda p: str(p.image.path))),
        unpaired=tuple(sorted(unpaired, key=lambda u: str(u.path))),
        unlabelled_series=tuple(unlabelled),
    )


__all__ = ["NAMED_MASKS", "ExportScan", "Pair", "Unpaired", "scan_export"]
