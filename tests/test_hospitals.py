"""Demo hospitals: site folders that the site loader reads back exactly as they were made."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import numpy as np
import pydicom
import pytest

from common.check import check_site
from common.dataset import LoadedSlice, iter_slices, load_site
from common.demo.hospitals import (
    SITE_PROFILES,
    demo_slices,
    make_demo,
    make_site,
    site_profile,
)
from common.demo.phantom import Structure
from protocols.classes import Tissue

SIZE = 64  # coarse but enough for a round trip; keeps the tests quick


def _loaded(root: Path) -> list[LoadedSlice]:
    items = list(iter_slices(load_site(root), with_reference=True))
    bad = [item for item in items if not isinstance(item, LoadedSlice)]
    assert not bad, bad
    return items  # type: ignore[return-value]


def test_registry_has_the_conventions_discrepancy_tests_need() -> None:
    keys = {p.key for p in SITE_PROFILES}
    for needed in (
        "reference-like",
        "psoas left out",
        "paraspinals left out",
        "IMAT included in muscle",
        "contours drawn 2 px tight",
    ):
        assert needed in keys
    assert len(SITE_PROFILES) >= 6
    formats = {p.mask_suffix for p in SITE_PROFILES}
    assert {".tag", ".png", ".nii.gz", ".npy", ".dcm"} <= formats
    assert {p.scanner.signed for p in SITE_PROFILES} == {True, False}
    # the default three sites show a convention difference
    first = [site_profile(i).convention for i in range(3)]
    assert first[0].include_psoas and not first[1].include_psoas and first[2].imat_as_muscle


def test_reference_like_profiles_follow_the_reference_convention_and_no_other_does() -> None:
    following = {p.key for p in SITE_PROFILES if p.follows_reference}
    assert following == {"reference-like", "reference-like, noisy scanner"}


@pytest.mark.parametrize("profile", SITE_PROFILES, ids=lambda p: p.key)
def test_every_profile_round_trips_through_the_site_loader(tmp_path: Path, profile) -> None:
    truth = list(demo_slices(profile, slices=3, size=SIZE, seed=5))
    root = make_site(tmp_path / "site", profile, slices=3, size=SIZE, seed=5)
    site = load_site(root)
    assert site.config.description and profile.convention.describe() in site.config.description
    loaded = _loaded(root)
    assert len(loaded) == len(truth) == 3
    for item, made in zip(loaded, truth, strict=True):
        np.testing.assert_array_equal(item.ct.hu, made.hu)  # signed/unsigned, intercept 0/-1024
        assert item.ct.spacing_mm == pytest.approx((made.spacing_mm, made.spacing_mm), rel=1e-5)
        np.testing.assert_array_equal(item.label, made.label)
        np.testing.assert_array_equal(item.reference, made.reference)
        assert item.height_m == made.anatomy.height_m and item.sex == made.anatomy.sex
        assert item.group == f"DEMO-0-{made.patient:03d}"


def test_site_values_and_imat_are_written_as_the_site_declares(tmp_path: Path) -> None:
    profile = SITE_PROFILES[0]  # Slice-O-Matic values 1 / 7 / 5, IMAT 2
    root = make_site(tmp_path / "a", profile, slices=2, size=96, seed=1)
    config = tomllib.loads((root / "site.toml").read_text())
    assert config["labels"] == {
        "muscle": [1],
        "subcutaneous_fat": [7],
        "visceral_fat": [5],
        "background": [2],
    }
    loaded = _loaded(root)
    assert set(loaded[0].label_values) == {0, 1, 2, 5, 7}


def test_conventions_differ_between_sites_on_the_same_patients(tmp_path: Path) -> None:
    ref = list(demo_slices(SITE_PROFILES[0], slices=2, size=SIZE, seed=9))
    no_psoas = list(demo_slices(SITE_PROFILES[1], slices=2, size=SIZE, seed=9))
    for a, b in zip(ref, no_psoas, strict=True):
        assert a.anatomy == b.anatomy  # the seed alone fixes the patients
        assert (b.label == Tissue.muscle).sum() < (b.reference == Tissue.muscle).sum()
        assert not ((b.label == Tissue.muscle) & (b.structures == Structure.psoas)).any()
        np.testing.assert_array_equal(a.label, a.reference)  # reference-like site labels like the reference


def test_same_patients_other_noise(tmp_path: Path) -> None:
    quiet = SITE_PROFILES[0]
    noisy = dataclasses.replace(quiet, scanner=dataclasses.replace(quiet.scanner, noise_sd=40.0))
    a = next(demo_slices(quiet, slices=1, size=SIZE, seed=2))
    b = next(demo_slices(noisy, slices=1, size=SIZE, seed=2))
    assert a.anatomy == b.anatomy
    np.testing.assert_array_equal(a.structures, b.structures)
    body = a.structures == Structure.subcutaneous_fat
    assert np.std(b.hu[body]) > 2 * np.std(a.hu[body])


def test_canary_is_planted_everywhere_it_should_be(tmp_path: Path) -> None:
    canary = "CANARY7Q"
    root = make_site(tmp_path / "c", SITE_PROFILES[1], slices=2, size=SIZE, seed=0, canary=canary)
    plain = make_site(tmp_path / "p", SITE_PROFILES[1], slices=2, size=SIZE, seed=0)
    assert canary in (root / "site.toml").read_text()
    images = sorted((root / "images").iterdir())
    assert images and all(canary in p.name for p in images)
    ds = pydicom.dcmread(images[0])
    for keyword in ("PatientID", "PatientName", "StudyDescription", "SeriesDescription"):
        assert canary in str(ds.get(keyword)), keyword
    other = pydicom.dcmread(sorted((plain / "images").iterdir())[0])
    assert canary not in str(other.PatientID) and canary not in (plain / "site.toml").read_text()
    assert ds.StudyInstanceUID != other.StudyInstanceUID  # the canary enters the UIDs' hash
    assert str(other.PatientID).startswith("DEMO-0-")


def test_some_patients_give_two_slices_and_some_rows_rely_on_dicom(tmp_path: Path) -> None:
    root = make_site(tmp_path / "f", SITE_PROFILES[5], slices=10, size=48, seed=0)
    site = load_site(root)
    groups = [row.group for row in site.rows]
    assert len(set(groups)) < len(groups)
    blank = [row for row in site.rows if row.height_m is None]
    assert blank and len(blank) < len(site.rows)
    for item in _loaded(root):
        assert item.height_m is not None and item.sex in ("M", "F")


def test_make_demo_folders_refusal_and_cycling(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    paths = make_demo(out, sites=3, slices=2, size=48, seed=0)
    assert [p.name for p in paths] == ["site-0", "site-1", "site-2"]
    names = {load_site(p).config.name for p in paths}
    assert len(names) == 3
    with pytest.raises(FileExistsError, match="not empty"):
        make_demo(out, sites=3, slices=2, size=48)
    again = make_demo(out, sites=3, slices=1, size=48, force=True)
    assert len(load_site(again[0]).rows) == 1
    beyond = site_profile(len(SITE_PROFILES))
    assert beyond.key == SITE_PROFILES[0].key and beyond.name != SITE_PROFILES[0].name


@pytest.mark.slow
def test_default_demo_passes_site_check(tmp_path: Path) -> None:
    paths = make_demo(tmp_path / "demo", sites=3, slices=12, size=128, seed=0)
    for index, path in enumerate(paths):
        report = check_site(load_site(path))
        assert report.n_usable == report.n_listed == 12 and not report.problems
        muscle = report.classes["muscle"].share_in_hu_range
        # a site that counts IMAT as muscle has fat-density pixels in its muscle, by design
        imat_in_muscle = site_profile(index).convention.imat_as_muscle
        assert muscle is not None and muscle >= (0.8 if imat_in_muscle else 0.97)
        assert report.classes["subcutaneous_fat"].share_in_hu_range >= 0.97
        assert report.n_groups < 12  # some patients gave two slices


def test_demo_make_command(tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from server.cli import app

    runner = CliRunner()
    out = tmp_path / "demo"
    args = ["demo", "make", str(out), "--sites", "2", "--slices", "2", "--size", "48", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    written = json.loads(result.output)
    assert [s["convention"] for s in written["sites"]] == ["reference-like", "psoas left out"]
    assert (out / "site-1" / "manifest.csv").is_file()
    refused = runner.invoke(app, args)
    assert refused.exit_code == 1 and "not empty" in refused.output
    assert runner.invoke(app, [*args, "--force"]).exit_code == 0


def test_demo_make_series_writes_a_whole_series_the_workbench_loader_reads(tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from common.series import load_volume, scan_folder
    from server.cli import app

    out = tmp_path / "demo"
    result = CliRunner().invoke(
        app, ["demo", "make", str(out), "--sites", "1", "--slices", "2", "--size", "64", "--series", "--json"]
    )
    assert result.exit_code == 0, result.output
    series_dir = Path(json.loads(result.output)["series"])
    listing = scan_folder(series_dir)
    main = max(listing.series, key=lambda s: s.count)  # the distractor series is shorter
    volume = load_volume(main)
    assert volume.hu.shape[0] == main.count > 20
