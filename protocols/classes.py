"""Canonical tissue classes, IoU bins and exclusion reasons."""

from __future__ import annotations

from enum import IntEnum, StrEnum
from typing import Final


class Tissue(IntEnum):
    """Canonical class values inside sarcofed (site masks are mapped to these)."""

    background = 0
    muscle = 1
    subcutaneous_fat = 2
    visceral_fat = 3


#: The three study tissues, in canonical order (value 1, 2, 3).
TISSUES: Final[tuple[str, ...]] = ("muscle", "subcutaneous_fat", "visceral_fat")
#: Classes scored by the seed paper: the three tissues plus their union.
METRIC_CLASSES: Final[tuple[str, ...]] = (*TISSUES, "msv")
#: Column headers of the seed's tables, by metric class.
SEED_COLUMN: Final[dict[str, str]] = {
    "muscle": "M",
    "subcutaneous_fat": "S",
    "visceral_fat": "V",
    "msv": "MSV",
}

#: The seed paper's IoU bins, best first, with these exact names.
IOU_BINS: Final[tuple[str, ...]] = ("[0.9,1.0]", "[0.8,0.9)", "[0.7,0.8)", "[0,0.7)")


class ExclusionReason(StrEnum):
    """Why a manifest row was not used. These codes travel in aggregate payloads."""

    missing_file = "missing_file"
    unreadable_image = "unreadable_image"
    not_ct = "not_ct"
    multi_frame = "multi_frame"
    not_axial = "not_axial"
    no_pixel_data = "no_pixel_data"
    no_pixel_spacing = "no_pixel_spacing"
    unreadable_label = "unreadable_label"
    shape_mismatch = "shape_mismatch"
    undeclared_label_value = "undeclared_label_value"
    empty_mask = "empty_mask"
    unreadable_reference = "unreadable_reference"
    no_reference = "no_reference"
    evaluation_error = "evaluation_error"
    invalid_manifest_row = "invalid_manifest_row"
    implausible_spacing = "implausible_spacing"
    implausible_hu = "implausible_hu"
    duplicate_row = "duplicate_row"

    @property
    def label(self) -> str:
        """A short human phrase for tables."""
        return _REASON_TEXT[self]


_REASON_TEXT: dict[ExclusionReason, str] = {
    ExclusionReason.missing_file: "file listed in manifest.csv does not exist",
    ExclusionReason.unreadable_image: "image is not a readable DICOM file",
    ExclusionReason.not_ct: "image is not CT (Modality is not CT)",
    ExclusionReason.multi_frame: "image is multi-frame (one axial slice per file expected)",
    ExclusionReason.not_axial: "image is not an axial slice",
    ExclusionReason.no_pixel_data: "image has no pixel data",
    ExclusionReason.no_pixel_spacing: "image has no pixel spacing (areas impossible)",
    ExclusionReason.unreadable_label: "label mask cannot be read",
    ExclusionReason.shape_mismatch: "mask shape differs from the image",
    ExclusionReason.undeclared_label_value: "mask holds a value declared nowhere in site.toml [labels]",
    ExclusionReason.empty_mask: "mask has no labelled pixel",
    ExclusionReason.unreadable_reference: "reference mask cannot be read or does not fit",
    ExclusionReason.no_reference: "row has no reference mask",
    ExclusionReason.evaluation_error: "evaluation failed on this slice",
    ExclusionReason.invalid_manifest_row: "manifest.csv row is invalid (see the check's details)",
    ExclusionReason.implausible_spacing: "pixel spacing outside what a CT scanner makes (header error?)",
    ExclusionReason.implausible_hu: "HU values outside the physical range (wrong rescale slope/intercept?)",
    ExclusionReason.duplicate_row: "image already listed on an earlier manifest.csv row",
}
