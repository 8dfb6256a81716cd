"""No single input may stop, hang or fool a site: each case becomes that row's exclusion.

Each case breaks row 0 of a 3-row site (real DICOM, real masks) and checks that ``site
check``, ``compare`` and the training loader all exclude exactly that row, with the expected
reason and a message naming the file, while the other two rows are still used.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from fixtures_site import make_site, write_manifest
from pydantic import ValidationError

from client.site_tasks import training_samples
from common.check import check_site, display_text
from common.dataset import load_site
from common.dicom_io import read_ct_slice, write_ct_slice
from common.errors import SiteFolderError, SliceError
from common.evaluation import compare_site
from common.masks import read_mask, write_mask
from common.site_file import MAX_FILE_BYTES, MAX_SLICE_PIXELS, require_regular_file
from protocols.classes import ExclusionReason as R
from protocols.site import SiteConfig

Row = dict[str, str]


def _rows(root: Path) -> list[Row]:
    with (root / "manifest.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def _edit_dicom(root: Path, row: Row, **values: object) -> None:
    path = root / row["image"]
    ds = pydicom.dcmread(path)
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    ds.save_as(path)


def _single_spacing(root: Path, rows: list[Row]) -> str:
    _edit_dicom(root, rows[0], PixelSpacing="0.7")
    return rows[0]["image"]


def _long_path(root: Path, rows: list[Row]) -> str:
    rows[0]["image"] = "ct/" + "a" * 5000 + ".dcm"
    return "a" * 100


def _nul_byte(root: Path, rows: list[Row]) -> str:
    rows[0]["image"] = "ct/slice\x00_0.dcm"
    return "ct/slice\x00_0.dcm"


def _huge_spacing(root: Path, rows: list[Row]) -> str:
    _edit_dicom(root, rows[0], PixelSpacing=["1e15", "1e15"])
    return rows[0]["image"]


def _micrometre_spacing(root: Path, rows: list[Row]) -> str:
    _edit_dicom(root, rows[0], PixelSpacing=["800", "800"])
    return rows[0]["image"]


def _wrong_slope(root: Path, rows: list[Row]) -> str:
    _edit_dicom(root, rows[0], RescaleSlope="1000")
    return rows[0]["image"]


def _fifo(root: Path, rows: list[Row]) -> str:
    os.remove(root / rows[0]["image"])
    os.mkfifo(root / rows[0]["image"])
    return rows[0]["image"]


def _dev_zero(root: Path, rows: list[Row]) -> str:
    os.remove(root / rows[0]["image"])
    os.symlink("/dev/zero", root / rows[0]["image"])
    return rows[0]["image"]


def _fifo_label(root: Path, rows: list[Row]) -> str:
    os.remove(root / rows[0]["label"])
    os.mkfifo(root / rows[0]["label"])
    return rows[0]["label"]


def _complex_mask(root: Path, rows: list[Row]) -> str:
    path = root / rows[0]["label"]
    np.save(path, np.load(path).astype(np.complex128) + 0.5j)
    return rows[0]["label"]


def _uint64_mask(root: Path, rows: list[Row]) -> str:
    path = root / rows[0]["label"]
    mask = np.load(path).astype(np.uint64)
    mask[0, 0] = 2**63
    np.save(path, mask)
    return rows[0]["label"]


def _empty_image(root: Path, rows: list[Row]) -> str:
    (root / rows[0]["image"]).write_bytes(b"")
    return rows[0]["image"]


CASES: dict[str, tuple[Callable[[Path, list[Row]], str], R, str]] = {
    # case: (break row 0 -> text the problem's file must hold, reason, text the detail must hold)
    "single-valued PixelSpacing": (_single_spacing, R.no_pixel_spacing, "1 value"),
    "5,000-character path": (_long_path, R.missing_file, "characters long"),
    "NUL byte in path": (_nul_byte, R.missing_file, "NUL byte"),
    "PixelSpacing 1e15": (_huge_spacing, R.implausible_spacing, "1e+15"),
    "PixelSpacing in micrometres": (_micrometre_spacing, R.implausible_spacing, "800"),
    "RescaleSlope 1000": (_wrong_slope, R.implausible_hu, "RescaleSlope 1000"),
    "image is a FIFO": (_fifo, R.unreadable_image, "FIFO"),
    "image links to /dev/zero": (_dev_zero, R.unreadable_image, "/dev/zero"),
    "label is a FIFO": (_fifo_label, R.unreadable_label, "FIFO"),
    "complex .npy mask": (_complex_mask, R.unreadable_label, "complex"),
    "uint64 mask holding 2**63": (_uint64_mask, R.unreadable_label, "value 9223372036854775808 (uint64)"),
    "zero-byte image": (_empty_image, R.unreadable_image, "empty"),
}


@pytest.fixture
def clean_site(tmp_path: Path) -> Path:
    return make_site(tmp_path, n=3, size=32, label_suffix=".npy", with_reference=True)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", sorted(CASES))
def test_one_bad_row_is_excluded_by_check_compare_and_training(clean_site: Path, case: str) -> None:
    breaker, reason, detail_text = CASES[case]
    rows = _rows(clean_site)
    file_text = display_text(breaker(clean_site, rows))
    write_manifest(clean_site, rows)
    site = load_site(clean_site)

    report = check_site(site)
    assert report.n_usable == 2 and report.excluded == {reason.value: 1}, report.problems
    (problem,) = report.problems
    assert file_text in problem.file and problem.line == 2
    assert detail_text in problem.detail

    payload, records = compare_site(site)
    assert payload.n_used == 2 and payload.excluded == {reason.value: 1}
    assert len(records) == 2

    samples, excluded = training_samples(site)
    assert len(samples) == 2 and excluded == {reason.value: 1}


def test_wrong_slope_no_longer_reaches_the_payload(clean_site: Path) -> None:
    rows = _rows(clean_site)
    _wrong_slope(clean_site, rows)
    payload, _ = compare_site(load_site(clean_site))
    muscle = payload.areas["muscle"]
    assert muscle.mean_hu_label is not None and -29 <= muscle.mean_hu_label <= 150


def test_duplicate_rows_are_counted_once_naming_the_first_line(clean_site: Path) -> None:
    rows = _rows(clean_site)
    write_manifest(clean_site, [*rows, dict(rows[0]), {**rows[1], "image": "./" + rows[1]["image"]}])
    site = load_site(clean_site)
    assert len(site.rows) == 3 and site.n_listed == 5
    report = check_site(site)
    assert report.n_usable == 3 and report.excluded == {R.duplicate_row.value: 2}
    details = {p.line: p.detail for p in report.problems}
    assert set(details) == {5, 6}
    assert "line 2" in details[5] and rows[0]["image"] in details[5]
    assert "line 3" in details[6]
    payload, _ = compare_site(site)
    assert payload.n_used == 3 and payload.excluded == {R.duplicate_row.value: 2}


def test_an_unbalanced_quote_names_its_line_and_spares_the_rows_below(clean_site: Path) -> None:
    lines = (clean_site / "manifest.csv").read_text().splitlines()
    lines[2] = '"' + lines[2]  # line 3 opens a quote it never closes
    (clean_site / "manifest.csv").write_text("\n".join(lines) + "\n")
    site = load_site(clean_site)
    assert [row.image for row in site.rows] == ["ct/slice_0.dcm", "ct/slice_2.dcm"]
    assert site.lines == [2, 4]
    (invalid,) = site.invalid_rows
    assert invalid.line == 3 and "unbalanced quote" in invalid.detail
    error = invalid.error(site.root)
    assert error.reason is R.invalid_manifest_row and "line 3" in error.detail
    assert "label" not in invalid.detail  # the old message blamed an empty label column
    # its cells still count as listed: the guard screens replies for every listed name
    assert "ct/slice_1.dcm" in site.listed("image") and "patient-1" in site.listed("group")


def test_check_reports_a_reference_of_the_wrong_shape(clean_site: Path) -> None:
    rows = _rows(clean_site)
    write_mask(clean_site / rows[1]["reference"], np.ones((10, 10), dtype=np.int64))
    site = load_site(clean_site)
    report = check_site(site)
    assert report.n_usable == 3 and report.problems == []
    (problem,) = report.reference_problems
    assert problem.file == rows[1]["reference"] and problem.line == 3
    assert problem.reason == R.unreadable_reference.value and "10x10" in problem.detail
    payload, _ = compare_site(site)
    assert payload.excluded == {R.unreadable_reference.value: 1}


@pytest.mark.parametrize("name", ["hospital\nb", "\x1b[31mhospital-b\x1b[0m", "tab\there", " padded"])
def test_a_site_name_must_be_printable_text_on_one_line(name: str, clean_site: Path) -> None:
    with pytest.raises(ValidationError, match="printable"):
        SiteConfig.model_validate(
            {"name": name, "labels": {"muscle": [1], "subcutaneous_fat": [7], "visceral_fat": [5]}}
        )
    toml = (clean_site / "site.toml").read_text()
    escaped = name.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\x1b", "\\u001b")
    (clean_site / "site.toml").write_text(toml.replace('name = "test-site"', f'name = "{escaped}"'))
    with pytest.raises(SiteFolderError, match="printable"):
        load_site(clean_site)


def test_real_padding_outside_the_field_of_view_is_still_plausible(tmp_path: Path) -> None:
    """A round field of view leaves ~21% corners at -3024 HU (no PixelPaddingValue): accepted."""
    hu = np.full((64, 64), 40.0)
    yy, xx = np.mgrid[0:64, 0:64]
    hu[np.hypot(yy - 31.5, xx - 31.5) > 32] = -3024.0
    path = write_ct_slice(tmp_path / "ct.dcm", hu, spacing_mm=(0.8, 0.8), intercept=-3072.0)
    assert read_ct_slice(path).hu.min() == pytest.approx(-3024.0)


def test_regular_file_guard(tmp_path: Path) -> None:
    big = tmp_path / "big.dcm"
    with big.open("wb") as handle:  # sparse: costs no disk
        handle.truncate(MAX_FILE_BYTES + 1)
    with pytest.raises(SliceError, match="67,108,865 bytes") as info:
        require_regular_file(big, R.unreadable_image, "image")
    assert info.value.reason is R.unreadable_image and info.value.path == big
    with pytest.raises(SliceError, match="folder"):
        require_regular_file(tmp_path, R.unreadable_label, "mask")
    small = tmp_path / "ok.dcm"
    small.write_bytes(b"x")
    assert require_regular_file(small, R.unreadable_image, "image") == 1


def test_a_mask_larger_than_a_slice_is_refused_before_it_is_decoded(tmp_path: Path) -> None:
    from PIL import Image

    side = int(MAX_SLICE_PIXELS**0.5) + 1
    path = tmp_path / "huge.png"
    Image.new("L", (side, side)).save(path)
    with pytest.raises(SliceError, match="more than one slice") as info:
        read_mask(path)
    assert info.value.reason is R.unreadable_label


def test_check_shows_control_characters_escaped_and_long_names_cut(clean_site: Path) -> None:
    """A file name or DICOM value holding an escape code must not recolour or clear the terminal."""
    rows = _rows(clean_site)
    _edit_dicom(clean_site, rows[1], Modality="\x1b[2JMR")
    os.rename(clean_site / rows[2]["label"], clean_site / "labels" / "a\x1b[31m.npy")
    rows[2]["label"] = "labels/a\x1b[31m.npy"
    rows[0]["label"] = "labels/" + "b" * 4000 + ".npy"
    write_manifest(clean_site, rows)
    report = check_site(load_site(clean_site))
    assert report.n_usable == 1 and len(report.problems) == 2
    shown = " ".join(f"{p.file} {p.detail}" for p in report.problems)
    assert "\x1b" not in shown and "\\x1b[2JMR" in shown
    (long,) = [p for p in report.problems if p.line == 2]
    assert len(long.file) < 300 and "4,011 characters" in long.file


@pytest.mark.timeout(60)
def test_a_series_scan_skips_a_fifo_instead_of_waiting_on_it(tmp_path: Path) -> None:
    from common.series import scan_folder

    write_ct_slice(tmp_path / "a.dcm", np.zeros((16, 16)), spacing_mm=(0.8, 0.8))
    os.mkfifo(tmp_path / "b.dcm")
    (tmp_path / "c.dcm").write_bytes(b"")
    listing = scan_folder(tmp_path)
    assert [len(s.slices) for s in listing.series] == [1]
    skipped = {item.path.name: item.reason for item in listing.skipped}
    assert "FIFO" in skipped["b.dcm"] and "empty" in skipped["c.dcm"]


def test_single_valued_orientation_and_position_do_not_cost_the_slice(tmp_path: Path) -> None:
    """Optional elements holding one value where DICOM asks for several: read as absent."""
    path = write_ct_slice(tmp_path / "ct.dcm", np.zeros((16, 16)), spacing_mm=(0.8, 0.8), position_z=12.5)
    ds = pydicom.dcmread(path)
    ds.ImageOrientationPatient = "1"
    ds.ImagePositionPatient = "0"
    ds.save_as(path)
    ct = read_ct_slice(path)
    assert ct.spacing_mm == (0.8, 0.8) and ct.slice_location == pytest.approx(12.5)
