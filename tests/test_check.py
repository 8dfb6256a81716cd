"""``sarcofed site check``: the report, the CLI and pydicom's whole test-file zoo."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from fixtures_site import make_site, write_manifest
from pydicom.data import get_testdata_files
from rich.console import Console
from typer.testing import CliRunner

from client.render import render_check
from common.check import SiteCheckReport, check_site
from common.dataset import load_site
from common.masks import write_mask
from protocols.classes import ExclusionReason
from protocols.protocol import LabelProtocol
from server.cli import app

runner = CliRunner()


def _rows(root: Path) -> list[dict[str, str]]:
    import csv

    with (root / "manifest.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def _messy_site(tmp_path: Path) -> Path:
    """5 rows: 2 good, 1 corrupt image, 1 undeclared mask value, 1 shape mismatch."""
    root = make_site(tmp_path, n=5, size=32, groups=2)
    (root / "ct" / "slice_2.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00garbage" * 20)
    undeclared = np.zeros((32, 32), dtype=np.int64)
    undeclared[10:20, 10:20] = 1
    undeclared[0, 0] = 9
    write_mask(root / "labels" / "slice_3.png", undeclared)
    write_mask(root / "labels" / "slice_4.png", np.ones((30, 32), dtype=np.int64))
    return root


def test_check_site_counts_and_statistics(tmp_path: Path) -> None:
    report = check_site(load_site(_messy_site(tmp_path)))
    assert (report.n_listed, report.n_usable) == (5, 2)
    assert report.excluded == {"shape_mismatch": 1, "undeclared_label_value": 1, "unreadable_image": 1}
    by_file = {p.file: p for p in report.problems}
    assert set(by_file) == {"ct/slice_2.dcm", "labels/slice_3.png", "labels/slice_4.png"}
    assert by_file["labels/slice_3.png"].line == 5 and "9" in by_file["labels/slice_3.png"].detail
    assert report.classes["muscle"].label_values == [1]
    assert report.classes["subcutaneous_fat"].label_values == [7]
    assert report.background_values == [0, 2]
    # the phantom: muscle 45 HU, SAT -100, VAT -90, noise sd 5 -> all inside the Alberta ranges
    assert report.classes["muscle"].share_in_hu_range == pytest.approx(1.0)
    assert report.classes["muscle"].mean_hu == pytest.approx(45.0, abs=1.0)
    assert report.classes["visceral_fat"].mean_hu == pytest.approx(-90.0, abs=1.0)
    assert report.pixel_spacing is not None and report.pixel_spacing.min_mm == pytest.approx(0.8)
    assert (report.n_groups, report.n_heights_known, report.n_sex_known) == (2, 2, 2)
    assert SiteCheckReport.model_validate_json(report.model_dump_json()) == report


def test_fat_labelled_as_muscle_shows_low_share_in_range(tmp_path: Path) -> None:
    root = make_site(tmp_path, n=1, size=32)
    toml = (root / "site.toml").read_text()
    # swap muscle and SAT values: a typical mapping mistake the HU check reveals
    toml = toml.replace("muscle = [1]", "muscle = [7]").replace(
        "subcutaneous_fat = [7]", "subcutaneous_fat = [1]"
    )
    (root / "site.toml").write_text(toml)
    report = check_site(load_site(root))
    assert report.classes["muscle"].share_in_hu_range == pytest.approx(0.0)
    assert report.classes["muscle"].mean_hu == pytest.approx(-100.0, abs=1.0)


def test_the_tissue_table_uses_the_protocol_the_audit_uses(tmp_path: Path) -> None:
    """A study protocol with another muscle HU range: the tissue table's range and in-range share
    follow it, as the label audit does (one protocol for both)."""
    root = make_site(tmp_path, n=2, size=32)
    protocol = LabelProtocol(name="dense-muscle", muscle_hu=(50.0, 150.0))
    report = check_site(load_site(root), protocol=protocol)
    assert report.classes["muscle"].hu_range == (50.0, 150.0)
    assert report.classes["muscle"].share_in_hu_range is not None
    assert report.classes["muscle"].share_in_hu_range < 0.5  # the phantom's muscle is 45 HU
    assert report.label_audit is not None and report.label_audit.protocol == "dense-muscle"


def test_cli_json(tmp_path: Path) -> None:
    result = runner.invoke(app, ["site", "check", str(_messy_site(tmp_path)), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["n_usable"] == 2 and data["excluded"]["unreadable_image"] == 1
    assert {p["reason"] for p in data["problems"]} == {
        "unreadable_image",
        "undeclared_label_value",
        "shape_mismatch",
    }


def test_cli_tables_and_progress(tmp_path: Path) -> None:
    result = runner.invoke(app, ["site", "check", str(_messy_site(tmp_path))])
    assert result.exit_code == 0
    assert "test-site" in result.output and "usable" in result.output
    assert "labels/slice_4.png" in result.output and "shape_mismatch" in result.output


def test_cli_invalid_folder_exits_1_without_traceback(tmp_path: Path) -> None:
    root = make_site(tmp_path, n=1, size=16)
    (root / "site.toml").write_text("name = 'x'\n")
    result = runner.invoke(app, ["site", "check", str(root)])
    assert result.exit_code == 1
    assert "labels: Field required" in result.output
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)  # a clean typer.Exit, not a crash


def test_cli_no_usable_slice_exits_1(tmp_path: Path) -> None:
    root = make_site(tmp_path, n=2, size=16)
    rows = _rows(root)
    for i, row in enumerate(rows):
        row["image"] = f"ct/missing_{i}.dcm"
    write_manifest(root, rows)
    result = runner.invoke(app, ["site", "check", str(root), "--json"])
    assert result.exit_code == 1
    assert json.loads(result.stdout)["excluded"] == {"missing_file": 2}


def test_cli_help_explains() -> None:
    result = runner.invoke(app, ["site", "check", "--help"])
    assert result.exit_code == 0
    assert "site.toml" in result.output and "Exit status" in result.output


def test_render_check_lists_reasons(tmp_path: Path) -> None:
    console = Console(record=True, width=200)
    render_check(check_site(load_site(_messy_site(tmp_path))), console)
    text = console.export_text()
    assert "mask holds a value declared nowhere in site.toml [labels]" in text and "-29..150" in text
    assert "declared nowhere in site.toml [labels]; add each" in text  # rich markup escaped


# ------------------------------------------------------------------ pydicom's test files
def _pydicom_zoo_site(tmp_path: Path) -> tuple[Path, int]:
    root = tmp_path / "zoo"
    (root / "images").mkdir(parents=True)
    (root / "site.toml").write_text(
        'name = "zoo"\n[labels]\nmuscle = [1]\nsubcutaneous_fat = [7]\nvisceral_fat = [5]\n'
    )
    rows = []
    for i, name in enumerate(sorted(get_testdata_files())):
        source = Path(name)
        if source.is_dir():
            continue
        image = root / "images" / f"{i:03d}_{source.name}"
        shutil.copy(source, image)
        try:
            header = pydicom.dcmread(source, stop_before_pixels=True, force=True)
            shape = (int(header.Rows), int(header.Columns))
        except Exception:
            shape = (16, 16)
        mask = np.zeros(shape, dtype=np.int64)
        mask[: shape[0] // 2, : shape[1] // 2] = 1
        mask[shape[0] // 2 :, shape[1] // 2 :] = 7
        label = write_mask(root / "labels" / f"{i:03d}.npy", mask)
        rows.append(
            {"image": image.relative_to(root).as_posix(), "label": label.relative_to(root).as_posix()}
        )
    write_manifest(root, rows)
    return root, len(rows)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom complains about its own odd files
def test_check_on_every_pydicom_test_file(tmp_path: Path) -> None:
    root, n_files = _pydicom_zoo_site(tmp_path)
    result = runner.invoke(app, ["site", "check", str(root), "--json"])
    assert result.exit_code == 0, result.output
    report = SiteCheckReport.model_validate_json(result.stdout)
    assert report.n_listed == n_files > 150
    assert report.n_usable + sum(report.excluded.values()) == n_files
    assert len(report.problems) == n_files - report.n_usable
    assert all(p.reason in ExclusionReason.__members__ and p.detail for p in report.problems)
    assert "evaluation_error" not in report.excluded  # no unexpected crash inside the check
    assert report.n_usable >= 10  # CT_small, 693_J2KI and the 16x16 CT slices of the DICOMDIR tree
    assert {"not_ct", "unreadable_image", "no_pixel_data", "not_axial"} <= set(report.excluded)


def test_check_shows_the_sites_label_conventions_without_any_model(tmp_path: Path) -> None:
    """Every site gets the model-free label audit from `site check`: a hospital that leaves out
    psoas sees it named before joining any study; a reference-convention one sees none."""
    from common.demo.hospitals import make_site as make_demo_site
    from common.demo.hospitals import site_profile

    psoas = check_site(load_site(make_demo_site(tmp_path / "b", site_profile(1), slices=6, size=192, seed=1)))
    assert psoas.label_audit is not None
    named = {(c.tissue, c.direction, c.region) for c in psoas.label_audit.findings}
    assert named == {("muscle", "site_excludes", "psoas")}
    reference = check_site(
        load_site(make_demo_site(tmp_path / "a", site_profile(0), slices=6, size=128, seed=1))
    )
    assert reference.label_audit is not None and reference.label_audit.findings == []
    console = Console(record=True, width=120)
    render_check(psoas, console)
    text = console.export_text()
    assert "alberta protocol" in text and "a convention of this site" in text


def test_check_says_whether_the_audit_confirms_each_declared_convention(tmp_path: Path) -> None:
    """site.toml label_conventions: `site check` tells the hospital, before any study, which of
    its declarations convention-aware training will apply."""
    from common.demo.hospitals import make_site as make_demo_site
    from common.demo.hospitals import site_profile

    root = make_demo_site(tmp_path / "b", site_profile(1), slices=6, size=128, seed=1)  # psoas left out
    toml = root / "site.toml"
    lines = toml.read_text(encoding="utf-8").splitlines()
    toml.write_text("\n".join([lines[0], 'label_conventions = ["psoas", "boundary"]', *lines[1:]]) + "\n")
    report = check_site(load_site(root))
    assert report.declared_conventions == {"psoas": True, "boundary": False}
    console = Console(record=True, width=200)
    render_check(report, console)
    text = console.export_text()
    assert "declares the label convention 'psoas': the audit confirms it" in text
    assert "declares the label convention 'boundary': the audit does not confirm it" in text
