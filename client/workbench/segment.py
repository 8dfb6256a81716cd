"""Pre-segment selected slices, quantify them, and save them into a site dataset folder.

Pre-segmentation uses the study model when one is given (``common.inference``); without
one, :func:`threshold_presegment` gives a rough HU-threshold pre-segmentation that the UI
labels as such. Saving writes masks in the site's own format and values (``site.toml``
``[labels]``, first value of each class), copies the original DICOM file unchanged, and
adds or replaces rows in ``manifest.csv``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import shutil
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from scipy import ndimage

from common.cutoffs import get_cutoff_set, is_sarcopenic
from common.masks import MASK_SUFFIXES, mask_suffix, write_mask
from common.metrics import mean_hu, smi, tissue_areas_cm2
from protocols.classes import TISSUES
from protocols.site import LabelMap, SiteConfig

from .state import Session

log = logging.getLogger(__name__)

FALLBACK_LABEL = "HU-threshold pre-segmentation (no model given): rough, check every class"
NEW_SITE_LABELS = LabelMap(muscle=[1], subcutaneous_fat=[2], visceral_fat=[3])
MANIFEST_COLUMNS = ("image", "label", "group", "height_m", "sex")


class SaveError(ValueError):
    """Saving to the site folder is not possible (the message says what to fix)."""


# ------------------------------------------------------------------ pre-segmentation


def _disk(radius_px: int) -> np.ndarray:
    r = max(radius_px, 1)
    y, x = np.ogrid[-r : r + 1, -r : r + 1]
    return x * x + y * y <= r * r


def threshold_presegment(hu: np.ndarray, spacing_mm: tuple[float, float]) -> np.ndarray:
    """Rough canonical mask from HU alone: SAT outside the muscle wall, VAT inside it, muscle in the wall.

    Body = largest connected region above -500 HU (holes filled). The muscle wall is muscle-
    range tissue (-29..150 HU) deeper than the skin, closed over 5 mm and filled: fat outside
    it is subcutaneous (-190..-30), fat inside it visceral (-150..-50), and muscle-range pixels
    within 25 mm of its edge are muscle. Organs deeper inside are left unlabelled, and psoas
    may be missed: a starting point for the brush, never a result.
    """
    pixel = float(min(spacing_mm))
    body_raw = hu > -500.0
    labels, n = ndimage.label(body_raw)
    out = np.zeros(hu.shape, dtype=np.uint8)
    if n == 0:
        return out
    sizes = ndimage.sum_labels(body_raw, labels, index=np.arange(1, n + 1))
    body = ndimage.binary_fill_holes(labels == 1 + int(np.argmax(sizes)))
    depth = ndimage.distance_transform_edt(body, sampling=spacing_mm)
    soft = (hu >= -29.0) & (hu <= 150.0) & body & (depth > 4.0)
    wall = ndimage.binary_closing(soft | ((hu > 150.0) & body), structure=_disk(round(5.0 / pixel)))
    inner = ndimage.binary_fill_holes(wall) & body
    inner_depth = ndimage.distance_transform_edt(inner, sampling=spacing_mm)
    out[(hu >= -190.0) & (hu <= -30.0) & body & ~inner & (depth > 2.0)] = 2
    out[(hu >= -150.0) & (hu <= -50.0) & inner] = 3
    out[(hu >= -29.0) & (hu <= 150.0) & inner & (inner_depth <= 25.0)] = 1
    return out


def model_presegment(model_path: Path, images: list[np.ndarray]) -> list[np.ndarray]:
    """Canonical masks from the study model at ``model_path`` (common.model format)."""
    from common.inference import predict_masks
    from common.model import load_model

    loaded = load_model(model_path)
    return predict_masks(loaded.model, loaded.spec, images, batch_size=4)


# ------------------------------------------------------------------ quantification


@dataclass(frozen=True)
class SliceQuant:
    """Areas, mean HU and SMI of one labelled slice."""

    index: int
    file: str
    areas_cm2: dict[str, float]
    mean_hu: dict[str, float | None]
    smi: float | None
    sarcopenic: bool | None


def quantify(
    session: Session, names: list[str], *, height_m: float | None, sex: str | None, cutoff_set: str
) -> list[SliceQuant]:
    """Per-slice areas (cm^2), mean HU, SMI (when height known) and the call under ``cutoff_set``."""
    get_cutoff_set(cutoff_set)  # unknown names fail here, listing the valid ones
    rows = []
    for item, name in zip(session.slices, names, strict=True):
        areas = tissue_areas_cm2(item.labels, item.spacing_mm)
        index = smi(areas["muscle"], height_m) if height_m else None
        rows.append(
            SliceQuant(
                index=item.index,
                file=name,
                areas_cm2=areas,
                mean_hu=mean_hu(item.labels, item.hu),
                smi=index,
                sarcopenic=is_sarcopenic(index, sex, cutoff_set),
            )
        )
    return rows


def quant_csv(rows: list[SliceQuant], *, height_m: float | None, sex: str | None, cutoff_set: str) -> str:
    """The quantitative panel as CSV text (one row per slice; names the cut-off set used)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    header = ["slice_index", "file"]
    header += [f"{t}_area_cm2" for t in TISSUES] + [f"{t}_mean_hu" for t in TISSUES]
    header += ["height_m", "sex", "smi_cm2_m2", "cutoff_set", "sarcopenic"]
    writer.writerow(header)
    for r in rows:
        values: list[object] = [r.index, r.file]
        values += [f"{r.areas_cm2[t]:.2f}" for t in TISSUES]
        values += ["" if r.mean_hu[t] is None else f"{r.mean_hu[t]:.1f}" for t in TISSUES]
        called = "" if r.sarcopenic is None else ("yes" if r.sarcopenic else "no")
        values += [height_m or "", sex or "", "" if r.smi is None else f"{r.smi:.2f}", cutoff_set, called]
        writer.writerow(values)
    return buffer.getvalue()


# ------------------------------------------------------------------ saving to a site


def site_config(site_dir: Path) -> SiteConfig:
    """``site.toml`` of ``site_dir``; written with canonical values 1/2/3 if the folder is new."""
    path = site_dir / "site.toml"
    if not path.exists():
        site_dir.mkdir(parents=True, exist_ok=True)
        name = site_dir.name or "site"
        path.write_text(
            f'name = "{name}"\n\n[labels]\nmuscle = [1]\nsubcutaneous_fat = [2]\nvisceral_fat = [3]\n',
            encoding="utf-8",
        )
        log.info("created %s", path)
    try:
        return SiteConfig.model_validate(tomllib.loads(path.read_text(encoding="utf-8")))
    except Exception as exc:
        raise SaveError(f"{path}: cannot be used ({exc}); fix site.toml before saving") from exc


def _read_manifest(path: Path) -> tuple[list[str], list[dict[str, str]], str]:
    if not path.exists():
        return list(MANIFEST_COLUMNS), [], ","
    text = path.read_text(encoding="utf-8-sig")
    first = text.splitlines()[0] if text.strip() else ""
    delimiter = ";" if first.count(";") > first.count(",") else ","
    reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
    header = [h.strip().lower() for h in (reader.fieldnames or [])] or list(MANIFEST_COLUMNS)
    rows = [{(k or "").strip().lower(): (v or "").strip() for k, v in row.items()} for row in reader]
    return header, [r for r in rows if any(r.values())], delimiter


def _mask_suffix(rows: list[dict[str, str]], wanted: str) -> str:
    if wanted and wanted != "auto":
        suffix = wanted if wanted.startswith(".") else f".{wanted}"
        if suffix not in MASK_SUFFIXES:
            raise SaveError(f"mask format {wanted!r} unknown; use one of {', '.join(MASK_SUFFIXES)} or auto")
        return suffix
    suffixes = [mask_suffix(Path(r["label"])) for r in rows if r.get("label")]
    known = [s for s in suffixes if s in MASK_SUFFIXES]
    return max(set(known), key=known.count) if known else ".png"


def _group_key(ds: pydicom.Dataset) -> str:
    ident = f"{ds.get('PatientID', '')}|{ds.get('PatientName', '')}|{ds.get('StudyInstanceUID', '')}"
    return "wb-" + hashlib.sha256(ident.encode()).hexdigest()[:12]


def save_to_site(
    session: Session, site_dir: Path, *, height_m: float | None, sex: str | None, mask_format: str = "auto"
) -> list[str]:
    """Copy each selected DICOM file into ``site_dir``, write its mask, add/replace its manifest row.

    Returns the manifest ``image`` paths written. Slices with no labelled pixel are refused
    (``common.dataset`` would exclude them as empty masks).
    """
    empty = [item.file.name for item in session.slices if not item.labels.any()]
    if empty:
        raise SaveError(f"no muscle, SAT or VAT pixel in {', '.join(empty)}: label them or leave them out")
    config = site_config(site_dir)
    if config.data_root is not None:
        raise SaveError(
            f"{site_dir / 'site.toml'} sets data_root (its manifest points into an export, read only); "
            "the workbench saves copies inside its site folder: give --site another folder"
        )
    values = np.array(
        [0, config.labels.muscle[0], config.labels.subcutaneous_fat[0], config.labels.visceral_fat[0]],
        dtype=np.int64,
    )
    manifest = site_dir / "manifest.csv"
    header, rows, delimiter = _read_manifest(manifest)
    suffix = _mask_suffix(rows, mask_format)
    header += [c for c in MANIFEST_COLUMNS if c not in header]
    written: list[str] = []
    for item in session.slices:
        ds = pydicom.dcmread(item.file, stop_before_pixels=True)
        stem = str(ds.get("SOPInstanceUID", "") or item.file.stem)
        image_rel, label_rel = f"images/{stem}.dcm", f"labels/{stem}{suffix}"
        image_path, label_path = site_dir / image_rel, site_dir / label_rel
        image_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(item.file, image_path)  # the original bytes, unchanged
        raw = values[item.labels.astype(np.int64)]
        write_mask(label_path, raw.astype(np.uint8 if raw.max() <= 255 else np.uint16), ct_path=image_path)
        row = {c: "" for c in header}
        row.update(image=image_rel, label=label_rel, group=_group_key(ds))
        row["height_m"] = f"{height_m:.2f}" if height_m else ""
        row["sex"] = sex or ""
        rows = [r for r in rows if r.get("image") != image_rel] + [row]
        written.append(image_rel)
    tmp = manifest.with_name(f".manifest.csv.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header, delimiter=delimiter, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(manifest)
    log.info("saved %d slices to %s", len(written), site_dir)
    return written
