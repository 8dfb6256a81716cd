"""``sarcofed site init``: three export layouts re-made from demo hospitals, checked end to end."""

from __future__ import annotations

import json
import os
import re
import shutil
import tomllib
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file
from typer.testing import CliRunner

from client.site_init import SECRET_FILE, init_site
from common.check import check_site
from common.dataset import load_site, load_slice
from common.demo.hospitals import SITE_PROFILES, SiteProfile, make_site
from common.demo.series import make_series
from common.errors import SiteFolderError, SliceError
from protocols.site import LabelMap
from server.cli import app

runner = CliRunner()
SIZE, SLICES = 64, 4


def _truth(profile: SiteProfile) -> LabelMap:
    return profile.values.label_map()


def _demo(tmp_path: Path, profile: SiteProfile, seed: int = 0) -> tuple[Path, list[tuple[Path, Path]]]:
    """A demo hospital and its (image, label) files, in manifest order."""
    root = make_site(tmp_path / "demo", profile, slices=SLICES, size=SIZE, seed=seed)
    site = load_site(root)
    return root, [(root / r.image, root / r.label) for r in site.rows]


def _usable(root: Path) -> int:
    return check_site(load_site(root)).n_usable


def _check_json(site: Path) -> tuple[int, dict[str, object]]:
    result = runner.invoke(app, ["site", "check", str(site), "--json"])
    return result.exit_code, json.loads(result.stdout)


def _reasons(report_unpaired: list[dict[str, str]]) -> dict[str, str]:
    return {p["file"]: p["reason"] for p in report_unpaired}


def test_slice_o_matic_export(tmp_path: Path) -> None:
    profile = SITE_PROFILES[0]  # Slice-O-Matic values and .tag masks
    demo, files = _demo(tmp_path, profile)
    export = tmp_path / "export"
    export.mkdir()
    for i, (image, label) in enumerate(files):
        shutil.copy(image, export / f"IMG{i:04d}.dcm")
        shutil.copy(label, export / (f"IMG{i:04d}.dcm.tag" if i % 2 else f"IMG{i:04d}.tag"))
    shutil.copy(files[0][1], export / "IMG0099.tag")  # a mask without its image
    (export / "notes.txt").write_text("exported 2024", encoding="utf-8")
    site = tmp_path / "site"

    result = runner.invoke(app, ["site", "init", str(export), "--out", str(site), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["proposal"]["slice_o_matic"] is True
    assert LabelMap.model_validate(report["proposal"]["labels"]) == _truth(profile)
    assert report["paired_by"] == {"Slice-O-Matic .tag by name": SLICES}
    reasons = _reasons(report["unpaired"])
    assert set(reasons) == {"IMG0099.tag", "notes.txt"}
    assert "no CT image of the same name" in reasons["IMG0099.tag"]
    assert report["next_command"] == f"sarcofed site check {site}"

    # nothing copied: the site folder holds its three files; the manifest points into the export
    assert sorted(p.name for p in site.iterdir()) == sorted(["site.toml", "manifest.csv", SECRET_FILE])
    config = tomllib.loads((site / "site.toml").read_text(encoding="utf-8"))
    assert Path(config["data_root"]) == export and "PLEASE CONFIRM" in (site / "site.toml").read_text()
    manifest = (site / "manifest.csv").read_text(encoding="utf-8")
    assert "DEMO-" not in manifest  # PatientIDs only as keyed hashes
    loaded = load_site(site)
    groups = [r.group for r in loaded.rows]
    assert all(g and g.startswith("p-") for g in groups) and len(set(groups)) == len(
        {r.group for r in load_site(demo).rows}
    )
    assert all(r.height_m is not None and r.sex in ("M", "F") for r in loaded.rows)

    code, checked = _check_json(site)
    assert code == 0 and checked["n_usable"] == _usable(demo) == SLICES
    assert checked["mapping"]["fits"] is True

    # never overwritten without --force; --force keeps the secret, so the groups stay the same
    again = runner.invoke(app, ["site", "init", str(export), "--out", str(site)])
    assert again.exit_code == 1 and "--force" in again.output
    assert runner.invoke(app, ["site", "init", str(export), "--out", str(site), "--force"]).exit_code == 0
    assert [r.group for r in load_site(site).rows] == groups

    # a wrong mapping (muscle and subcutaneous fat swapped) fails the check with the right proposal
    text = (site / "site.toml").read_text(encoding="utf-8")
    text = re.sub(r"^muscle = \[1\]$", "muscle = [7]", text, flags=re.M)
    text = re.sub(r"^subcutaneous_fat = \[7\]$", "subcutaneous_fat = [1]", text, flags=re.M)
    (site / "site.toml").write_text(text, encoding="utf-8")
    code, checked = _check_json(site)
    assert code == 1
    mapping = checked["mapping"]
    assert isinstance(mapping, dict) and mapping["fits"] is False
    assert tomllib.loads(mapping["toml"])["labels"] == _truth(profile).model_dump(exclude_defaults=True)


@pytest.mark.parametrize("index", [5, 2, 1], ids=["nii", "nii.gz-imat-in-muscle", "png-psoas-left-out"])
def test_masks_named_after_their_image_in_another_folder(tmp_path: Path, index: int) -> None:
    profile = SITE_PROFILES[index]  # .nii with muscle = 3 and SAT = 1; .nii.gz 10/20/30; .png 1/2/3
    suffix = profile.mask_suffix
    demo, files = _demo(tmp_path, profile, seed=2)
    export = tmp_path / "export"
    (export / "dicom").mkdir(parents=True)
    (export / "masks").mkdir()
    for i, (image, label) in enumerate(files):
        shutil.copy(image, export / "dicom" / f"case{i}.dcm")
        shutil.copy(label, export / "masks" / (f"case{i}_mask{suffix}" if i == 0 else f"case{i}{suffix}"))
    shutil.copy(files[1][1], export / "masks" / f"case1.dcm{suffix}")  # a second mask for case1
    shutil.copy(files[1][1], export / "masks" / f"lost{suffix}")
    report = init_site(export, tmp_path / "site")
    assert report.proposal.labels == _truth(profile)
    assert report.n_rows == SLICES and report.paired_by == {f"{suffix} mask by name": SLICES}
    reasons = {p.file: (p.reason, p.detail) for p in report.unpaired}
    assert set(reasons) == {f"masks/case1.dcm{suffix}", f"masks/lost{suffix}"}
    reason, detail = reasons[f"masks/case1.dcm{suffix}"]
    assert "second mask" in reason and detail == f"case1.dcm has case1{suffix}"
    code, checked = _check_json(tmp_path / "site")
    assert code == 0 and checked["n_usable"] == _usable(demo) == SLICES


def test_dicom_seg_paired_by_reference_and_whole_series_listed(tmp_path: Path) -> None:
    profile = SITE_PROFILES[4]  # DICOM SEG masks
    demo, files = _demo(tmp_path, profile, seed=4)
    _, other_files = _demo(tmp_path / "other", profile, seed=5)
    export = tmp_path / "export"
    (export / "ct").mkdir(parents=True)
    (export / "seg").mkdir()
    for i, (image, label) in enumerate(files):
        shutil.copy(image, export / "ct" / f"{i:03d}.dcm")
        shutil.copy(label, export / "seg" / f"SEG_{(i * 7919) % 1000:04d}.dcm")  # unrelated names
    shutil.copy(other_files[0][1], export / "seg" / "stray.dcm")  # drawn on a CT not in the export
    truth = make_series(export / "series", slices=24, size=64, seed=1)
    report = init_site(export, tmp_path / "site")
    assert report.proposal.labels == _truth(profile)
    assert report.paired_by == {"DICOM SEG by referenced SOPInstanceUID": SLICES}
    reasons = {p.file: p.reason for p in report.unpaired}
    assert (
        set(reasons) == {"seg/stray.dcm"} and "which no CT file in the export has" in reasons["seg/stray.dcm"]
    )
    by_uid = {s.series_uid: s for s in report.series}
    main = by_uid[truth.series_uid]
    assert main.slices == 24 and main.folder == "series"
    assert main.command.startswith("sarcofed site workbench ") and str(export / "series") in main.command
    assert truth.distractor_uid in by_uid  # every series without a mask is listed
    code, checked = _check_json(tmp_path / "site")
    assert code == 0 and checked["n_usable"] == _usable(demo) == SLICES


def test_nothing_paired_writes_nothing_and_says_why_per_file(tmp_path: Path) -> None:
    export = tmp_path / "export"
    export.mkdir()
    (export / "a.png").write_bytes(b"not a png")
    for name in ("CT_small.dcm", "MR_small.dcm"):
        shutil.copy(get_testdata_file(name), export / name)
    os.mkfifo(export / "pipe.dcm")  # reading it would block forever
    (export / "zero.dcm").symlink_to("/dev/zero")
    result = runner.invoke(app, ["site", "init", str(export), "--out", str(tmp_path / "site"), "--json"])
    assert result.exit_code == 1 and not (tmp_path / "site").exists()
    reasons = _reasons(json.loads(result.stdout)["unpaired"])
    assert "no CT image of the same name" in reasons["a.png"]
    assert "CT image with no mask" in reasons["CT_small.dcm"]
    assert "MR" in reasons["MR_small.dcm"]
    assert "not a regular file" in reasons["pipe.dcm"]
    assert set(reasons) == {"a.png", "CT_small.dcm", "MR_small.dcm", "pipe.dcm", "zero.dcm"}
    shown = runner.invoke(app, ["site", "init", str(export), "--out", str(tmp_path / "site")])
    assert shown.exit_code == 1 and "No usable image-mask pair" in shown.output
    missing = runner.invoke(
        app, ["site", "init", str(tmp_path / "nope"), "--out", str(tmp_path / "s")], env={"COLUMNS": "300"}
    )
    assert missing.exit_code == 1 and "not a folder" in missing.output and "Traceback" not in missing.output
    helped = runner.invoke(app, ["site", "init", "--help"], env={"COLUMNS": "80"})
    assert helped.exit_code == 0 and "SOPInstanceUID" in helped.output
    assert max(len(line) for line in helped.output.splitlines()) <= 80


def test_data_root_is_a_root_that_paths_cannot_leave(tmp_path: Path) -> None:
    demo, _ = _demo(tmp_path, SITE_PROFILES[1])
    site = tmp_path / "site"
    site.mkdir()
    (site / "site.toml").write_text(
        f'name = "x"\ndata_root = "../demo"\n\n{SITE_PROFILES[1].values.toml()}', encoding="utf-8"
    )
    rows = (demo / "manifest.csv").read_text(encoding="utf-8").splitlines()
    rows.append(rows[1].replace("images/", "../site/../../etc/", 1))
    (site / "manifest.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    loaded = load_site(site)
    assert loaded.data_root.resolve() == demo.resolve()
    assert load_slice(loaded, 0).label.any()  # relative data_root resolves against the site folder
    with pytest.raises(SliceError, match="leaves data_root"):
        load_slice(loaded, len(loaded.rows) - 1)
    (site / "site.toml").write_text(
        f'name = "x"\ndata_root = "missing"\n\n{SITE_PROFILES[1].values.toml()}', encoding="utf-8"
    )
    with pytest.raises(SiteFolderError, match="data_root"):
        load_site(site)


def test_workbench_does_not_save_into_a_site_that_reads_an_export(tmp_path: Path) -> None:
    from client.workbench.site_save import SaveError, save_to_site
    from client.workbench.state import Session
    from common.series import SeriesInfo

    site = tmp_path / "site"
    site.mkdir()
    (site / "site.toml").write_text(
        f'name = "x"\ndata_root = "{tmp_path}"\n\n{SITE_PROFILES[1].values.toml()}', encoding="utf-8"
    )
    session = Session(
        id="s",
        series=SeriesInfo(key="k", series_uid="1.2", description="", study_uid="1.3", slices=()),
        method="fallback",
        method_label="",
        slices=[],
        height_m=None,
        sex=None,
    )
    with pytest.raises(SaveError, match="data_root"):
        save_to_site(session, site, height_m=None, sex=None)
    assert not (site / "manifest.csv").exists()


def test_a_problem_shared_by_many_files_is_printed_once(tmp_path: Path) -> None:
    """A demo hospital's own folder as the export: every reference mask is a second mask of its
    image. The report says so once, with the count, not once per file (issue 14, item 4)."""
    demo, _ = _demo(tmp_path, SITE_PROFILES[0])
    result = runner.invoke(
        app, ["site", "init", str(demo), "--out", str(tmp_path / "site")], env={"COLUMNS": "80"}
    )
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert text.count("a second mask for an image that already has one") == 1
    assert f"{SLICES} x a second mask" in text
