"""Pre-segment selected slices and quantify them (saving them is ``site_save``).

Pre-segmentation uses the study model when one is given (``common.inference``); without
one, :func:`threshold_presegment` gives a rough HU-threshold pre-segmentation that the UI
labels as such.
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from common.cutoffs import get_cutoff_set, is_sarcopenic
from common.metrics import mean_hu, smi, tissue_areas_cm2
from protocols.classes import TISSUES

from .state import Session

log = logging.getLogger(__name__)

FALLBACK_LABEL = "HU-threshold pre-segmentation (no model given): rough, check every class"


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
    """Canonical masks from the study model at ``model_path`` (common.model format), run on this
    machine's fastest inference path (``common.device``, ``auto``)."""
    from common.device import resolve_compute
    from common.inference import predict_masks
    from common.model import load_model

    loaded = load_model(model_path)
    compute = resolve_compute(purpose="inference")
    return predict_masks(loaded.model, loaded.spec, images, batch_size=4, compute=compute)


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
