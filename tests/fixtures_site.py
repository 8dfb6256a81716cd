"""Tiny, valid site folders for tests (real DICOM files, real masks).

``make_site(tmp_path, n=3, size=64, ...) -> Path`` writes ``<tmp_path>/<name>/`` with
``site.toml``, ``manifest.csv``, ``ct/slice_<i>.dcm`` and ``labels/slice_<i><suffix>``.
Site values follow the Slice-O-Matic habit: muscle 1, IMAT 2 (declared background),
visceral fat 5, subcutaneous fat 7. ``phantom(size, seed)`` returns (hu, raw mask).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from common.dicom_io import PatientInfo, write_ct_slice
from common.masks import write_mask

SITE_VALUES = {"muscle": 1, "imat": 2, "visceral_fat": 5, "subcutaneous_fat": 7}
TISSUE_HU = {"air": -1000.0, "subcutaneous_fat": -100.0, "muscle": 45.0, "visceral_fat": -90.0, "organ": 35.0}
SITE_TOML = """name = "{name}"

[labels]
muscle = [1]
subcutaneous_fat = [7]
visceral_fat = [5]
background = [2]
"""


def phantom(size: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A crude L3 cross-section: SAT ring, muscle ring (with an IMAT blob), VAT, organs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    cy, cx = size / 2 + rng.uniform(-1, 1), size / 2 + rng.uniform(-1, 1)
    r = np.hypot((yy - cy) / (0.38 * size), (xx - cx) / (0.46 * size))
    hu = np.full((size, size), TISSUE_HU["air"])
    mask = np.zeros((size, size), dtype=np.int64)
    zones = [
        (1.00, "subcutaneous_fat"),
        (0.80, "muscle"),
        (0.65, "visceral_fat"),
        (0.35, "organ"),
    ]
    for radius, tissue in zones:
        inside = r <= radius
        hu[inside] = TISSUE_HU[tissue]
        mask[inside] = SITE_VALUES.get(tissue, 0)
    blob = np.hypot(yy - (cy - 0.72 * 0.38 * size), xx - cx) <= max(1.0, size / 32)
    hu[blob] = -60.0
    mask[blob] = SITE_VALUES["imat"]
    hu += rng.normal(0.0, 5.0, size=hu.shape)
    return hu, mask


def make_site(
    tmp_path: Path,
    n: int = 3,
    size: int = 64,
    *,
    name: str = "test-site",
    label_suffix: str = ".png",
    with_reference: bool = False,
    spacing_mm: tuple[float, float] = (0.8, 0.8),
    with_height: bool = True,
    groups: int | None = None,
) -> Path:
    """Write a minimal valid site folder and return its path.

    ``label_suffix`` picks the mask format (.png .npy .nii .nii.gz .tag .dcm). With
    ``with_reference`` each row also gets ``references/slice_<i>.npy``, where IMAT (2) is
    relabelled muscle (1). ``groups`` (default n) patients are assigned round-robin.
    """
    root = tmp_path / name
    (root / "ct").mkdir(parents=True)
    (root / "site.toml").write_text(SITE_TOML.format(name=name), encoding="utf-8")
    n_groups = groups or n
    rows = []
    for i in range(n):
        hu, mask = phantom(size, seed=i)
        sex = "M" if i % 2 == 0 else "F"
        ct = write_ct_slice(
            root / "ct" / f"slice_{i}.dcm",
            hu,
            spacing_mm=spacing_mm,
            patient=PatientInfo(patient_id=f"P{i % n_groups}", sex=sex),
            position_z=float(i),
        )
        label = write_mask(root / "labels" / f"slice_{i}{label_suffix}", mask, ct_path=ct)
        row = {
            "image": ct.relative_to(root).as_posix(),
            "label": label.relative_to(root).as_posix(),
            "group": f"patient-{i % n_groups}",
            "height_m": f"{1.60 + 0.05 * (i % 20):.2f}" if with_height else "",
            "sex": sex,
        }
        if with_reference:
            reference = np.where(mask == SITE_VALUES["imat"], SITE_VALUES["muscle"], mask)
            ref = write_mask(root / "references" / f"slice_{i}.npy", reference)
            row["reference"] = ref.relative_to(root).as_posix()
        rows.append(row)
    with (root / "manifest.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def write_manifest(root: Path, rows: list[dict[str, str]]) -> None:
    """Overwrite ``manifest.csv`` with ``rows`` (columns = union of keys, in first-seen order)."""
    fields: list[str] = []
    for row in rows:
        fields.extend(k for k in row if k not in fields)
    with (root / "manifest.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
