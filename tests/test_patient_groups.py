"""One patient, one group, however the slices reached the site (client.patient_groups).

``site init`` and the workbench's "Save to site" both write manifest ``group`` values; the
splits keep a group on one side, and the release minimums count patients by group. Before this
rule had one owner, the workbench wrote ``wb-`` + a plain sha256 of PatientID, PatientName and
StudyInstanceUID: the same patient saved from two studies became two patients, and the group
was a hash anyone could recompute from a list of patient numbers.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pydicom

from client.patient_groups import SECRET_FILE, patient_group, read_secret
from client.site_init import init_site
from client.workbench.site_save import read_manifest, save_to_site
from client.workbench.state import Session, SliceLabels
from common.dataset import load_site
from common.demo.hospitals import SITE_PROFILES, make_site
from common.dicom_io import read_ct_slice


def _with_ids(src: Path, dst: Path, patient_id: str, study_uid: str) -> Path:
    ds = pydicom.dcmread(src)
    ds.PatientID, ds.StudyInstanceUID = patient_id, study_uid
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst)
    return dst


def _session(files: list[Path]) -> Session:
    slices = []
    for i, f in enumerate(files):
        ct = read_ct_slice(f)
        labels = np.zeros(ct.hu.shape, np.uint8)
        labels[10:20, 10:20] = 1
        slices.append(SliceLabels(file=f, index=i, hu=ct.hu, spacing_mm=ct.spacing_mm, labels=labels))
    return Session(
        id="s",
        series=None,
        method="model",
        method_label="",
        slices=slices,
        height_m=1.7,
        sex="F",  # type: ignore[arg-type]
    )


def test_one_patient_saved_from_two_studies_is_one_group(tmp_path: Path) -> None:
    """A baseline and a follow-up CT of one patient (the usual sarcopenia study) are one patient
    to the splits and the release minimums; the group is not a plain hash of the PatientID."""
    demo = make_site(tmp_path / "demo", SITE_PROFILES[1], slices=2, size=64, seed=0)
    rows = load_site(demo).rows
    site = tmp_path / "site"
    files = [
        _with_ids(demo / rows[0].image, tmp_path / "wb" / "a.dcm", "MRN-0042", "1.2.3.1"),  # baseline
        _with_ids(demo / rows[1].image, tmp_path / "wb" / "b.dcm", "MRN-0042", "1.2.3.2"),  # follow-up
        _with_ids(demo / rows[1].image, tmp_path / "wb" / "c.dcm", "MRN-0077", "1.2.3.3"),
    ]
    save_to_site(_session(files[:1]), site, height_m=1.7, sex="F")
    save_to_site(_session(files[1:]), site, height_m=1.7, sex="F")
    secret = read_secret(site)
    assert secret is not None
    _, saved, _ = read_manifest(site / "manifest.csv")
    groups = [r["group"] for r in saved]
    assert groups.count(patient_group(secret, "MRN-0042")) == 2  # one patient, one group
    assert groups.count(patient_group(secret, "MRN-0077")) == 1
    assert not any(hashlib.sha256(b"MRN-0042").hexdigest()[:12] in g for g in groups)
    assert len({s.group for s in load_site(site).rows}) == 2


def test_site_init_groups_by_the_same_rule(tmp_path: Path) -> None:
    demo = make_site(tmp_path / "demo", SITE_PROFILES[1], slices=2, size=64, seed=0)
    export = tmp_path / "export"
    for i, r in enumerate(load_site(demo).rows):
        _with_ids(demo / r.image, export / f"IMG{i}.dcm", "MRN-0042", f"1.2.3.{i}")
        shutil.copy(demo / r.label, export / f"IMG{i}{Path(r.label).suffix}")
    site = tmp_path / "site"
    init_site(export, site)
    secret = read_secret(site)
    assert secret is not None and (site / SECRET_FILE).stat().st_mode & 0o777 == 0o600
    _, rows, _ = read_manifest(site / "manifest.csv")
    assert [r["group"] for r in rows] == [patient_group(secret, "MRN-0042")] * 2


def test_the_workbench_makes_the_secret_of_a_new_site_and_keeps_it(tmp_path: Path) -> None:
    demo = make_site(tmp_path / "demo", SITE_PROFILES[0], slices=1, size=64, seed=0)
    image = demo / load_site(demo).rows[0].image
    site = tmp_path / "new-site"
    save_to_site(
        _session([_with_ids(image, tmp_path / "a.dcm", "MRN-1", "1.2")]), site, height_m=None, sex=None
    )
    secret = read_secret(site)
    assert secret is not None and (site / SECRET_FILE).stat().st_mode & 0o777 == 0o600
    save_to_site(
        _session([_with_ids(image, tmp_path / "b.dcm", "MRN-1", "1.3")]), site, height_m=None, sex=None
    )
    assert read_secret(site) == secret
    _, rows, _ = read_manifest(site / "manifest.csv")
    assert [r["group"] for r in rows] == [patient_group(secret, "MRN-1")] * 2
