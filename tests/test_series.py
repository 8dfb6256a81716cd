"""Whole-series loading: position sorting, mixed series, compressed files, MPR aspect, L3 suggestion."""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from common.demo.series import DemoSeries, make_series
from common.l3_suggestion import suggest_l3
from common.reformat import Reformat, orientation_letters, reformat, square_pixels
from common.series import (
    CTVolume,
    SeriesError,
    SeriesInfo,
    SliceHeader,
    load_volume,
    order_slices,
    scan_folder,
)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoSeries:
    return make_series(tmp_path_factory.mktemp("series") / "ct", slices=64, size=128, seed=0)


def _header(name: str, z: float | None, number: int = 1) -> SliceHeader:
    return SliceHeader(
        path=Path(name),
        sop_uid=name,
        position=None if z is None else (0.0, 0.0, z),
        orientation=(1, 0, 0, 0, 1, 0),
        instance_number=number,
        slice_location=None,
        rows=4,
        columns=4,
        slice_thickness=2.0,
    )


def test_order_uses_position_not_name_and_measures_spacing() -> None:
    order = order_slices([_header("a.dcm", 0.0), _header("b.dcm", 10.0), _header("c.dcm", 5.0)])
    assert [h.path.name for h in order.slices] == ["b.dcm", "c.dcm", "a.dcm"]  # superior (+z) first
    assert order.positions_mm == (10.0, 5.0, 0.0)
    assert order.spacing_mm == pytest.approx(5.0) and order.uniform


def test_order_flags_gaps_and_refuses_duplicates() -> None:
    gappy = order_slices([_header(f"{z}.dcm", z) for z in (0.0, 2.0, 4.0, 10.0, 12.0)])
    assert not gappy.uniform and "varies" in gappy.note and gappy.spacing_mm == pytest.approx(2.0)
    with pytest.raises(SeriesError, match="same position"):
        order_slices([_header("x.dcm", 3.0), _header("y.dcm", 3.0)])


def test_scan_separates_series_and_sorts_shuffled_files(demo: DemoSeries) -> None:
    listing = scan_folder(demo.folder)
    assert [s.count for s in listing.series] == [64, 5]
    assert (
        listing.series[0].series_uid == demo.series_uid
        and listing.series[1].series_uid == demo.distractor_uid
    )
    volume = load_volume(listing.series[0])
    assert volume.files == demo.files  # the true superior-to-inferior order
    assert [p.name for p in volume.files] != sorted(p.name for p in volume.files)  # names are shuffled
    assert np.all(np.diff(volume.positions_mm) < 0)
    assert volume.spacing_mm == pytest.approx(demo.spacing_mm, abs=1e-3)
    assert volume.hu.shape == (64, 128, 128) and volume.hu.dtype == np.float32
    assert volume.height_m == demo.height_m and volume.sex == demo.sex


def test_real_compressed_files_and_skips(tmp_path: Path) -> None:
    for name in ("CT_small.dcm", "693_J2KI.dcm", "J2K_pixelrep_mismatch.dcm", "MR_small.dcm", "JPEG2000.dcm"):
        shutil.copy(get_testdata_file(name), tmp_path / name)
    (tmp_path / "notes.txt").write_text("not dicom")
    listing = scan_folder(tmp_path)
    assert sorted(s.count for s in listing.series) == [1, 1]  # single files are 1-slice series
    reasons = {s.path.name: s.reason for s in listing.skipped}
    assert reasons["J2K_pixelrep_mismatch.dcm"].startswith(
        "not axial"
    )  # its slice normal is tilted 22 degrees
    assert reasons["MR_small.dcm"].startswith("Modality is MR")
    assert reasons["JPEG2000.dcm"].startswith("Modality is NM")
    assert "not a DICOM" in reasons["notes.txt"]
    for series in listing.series:  # 693_J2KI is JPEG 2000 compressed
        volume = load_volume(series)
        assert volume.shape[0] == 1 and volume.hu.shape[1] in (128, 512)
        assert -1100 < float(np.median(volume.hu)) < 3000
    shapes = {load_volume(s).files[0].name: load_volume(s).shape for s in listing.series}
    assert shapes["CT_small.dcm"] == (1, 128, 128)


def test_symlink_outside_folder_is_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), outside / "secret.dcm")
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(outside / "secret.dcm", root / "link.dcm")
    listing = scan_folder(root)
    assert not listing.series
    assert "outside" in listing.skipped[0].reason


def _volume(hu: np.ndarray, spacing: tuple[float, float, float]) -> CTVolume:
    info = SeriesInfo(key="k", series_uid="1.2", description="", study_uid="", slices=())
    files = tuple(Path(f"{i}.dcm") for i in range(hu.shape[0]))
    return CTVolume(
        hu=hu, spacing_mm=spacing, files=files, positions_mm=tuple(range(hu.shape[0])), series=info
    )


def test_reformat_keeps_true_aspect() -> None:
    hu = np.zeros((10, 20, 30), dtype=np.float32)
    hu[5] = 1000.0  # one bright slice, 4 mm thick, 4 mm below the 5th slice boundary
    volume = _volume(hu, (4.0, 1.0, 1.0))
    coronal = reformat(volume, "coronal", 3)
    assert coronal.image.shape == (10, 30) and coronal.pixel_mm == (4.0, 1.0) and coronal.aspect == 4.0
    square = square_pixels(coronal)
    assert square.shape == (40, 30)  # 40 mm tall, 30 mm wide: not squashed
    bright = np.flatnonzero(square[:, 0] > 500)
    assert bright.min() >= 19 and bright.max() <= 24  # the slab sits at 20-24 mm
    assert square_pixels(reformat(volume, "sagittal", 0)).shape == (40, 20)
    assert square_pixels(Reformat(np.zeros((8, 8)), (1.0, 0.5))).shape == (16, 8)
    with pytest.raises(ValueError, match="outside"):
        reformat(volume, "axial", 10)


def test_orientation_letters_follow_image_orientation() -> None:
    standard = orientation_letters(None)
    assert standard == orientation_letters((1.0, 0.0, 0.0, 0.0, 1.0, 0.0))
    assert standard["axial"] == {"top": "A", "bottom": "P", "left": "R", "right": "L"}
    assert standard["coronal"] == {"top": "S", "bottom": "I", "left": "R", "right": "L"}
    assert standard["sagittal"] == {"top": "S", "bottom": "I", "left": "A", "right": "P"}
    # a prone patient scanned head first: rows run to the patient's right, columns forwards
    prone = orientation_letters((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0))
    assert prone["axial"] == {"top": "P", "bottom": "A", "left": "L", "right": "R"}
    assert prone["sagittal"]["left"] == "P" and prone["coronal"]["right"] == "R"
    # a slightly tilted gantry still names the dominant direction
    tilted = orientation_letters((0.98, 0.2, 0.0, -0.2, 0.98, 0.0))
    assert tilted["axial"] == standard["axial"]


def test_l3_suggestion_finds_true_l3(demo: DemoSeries) -> None:
    volume = load_volume(scan_folder(demo.folder).series[0])
    suggestion = suggest_l3(volume)
    first, last = demo.l3
    assert suggestion.anchor == "sacrum"
    assert suggestion.start is not None and suggestion.end is not None
    assert first <= (suggestion.start + suggestion.end) / 2 <= last  # the middle of the true L3 body
    assert [v.name for v in suggestion.vertebrae][-4:] == ["L3", "L4", "L5", "S1"]
    # Without the sacrum (scan stops in L4), count down from the last rib-bearing vertebra instead.
    cropped = replace(volume, hu=volume.hu[: demo.levels["L4"][1]])
    from_top = suggest_l3(cropped)
    assert from_top.anchor == "ribs"
    assert from_top.start is not None and from_top.end is not None
    assert first <= (from_top.start + from_top.end) / 2 <= last


def test_l3_suggestion_declines_without_a_spine() -> None:
    flat = _volume(np.full((30, 32, 32), -100.0, dtype=np.float32), (3.0, 1.0, 1.0))
    suggestion = suggest_l3(flat)
    assert not suggestion.found and suggestion.anchor == "none" and "pick L3 by eye" in suggestion.note
