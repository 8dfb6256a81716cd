"""The site-dataset contract: folder errors, row errors, slices, label mapping, fingerprint."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from fixtures_site import make_site, write_manifest

from common.dataset import (
    INVALID_ROW_REASON,
    LoadedSlice,
    dataset_fingerprint,
    iter_slices,
    load_site,
    load_slice,
    map_labels,
    row_group,
)
from common.dicom_io import write_ct_slice
from common.errors import SiteFolderError, SliceError
from common.masks import write_mask
from common.splits import split_site
from protocols.classes import ExclusionReason as R
from protocols.site import LabelMap
from protocols.study import TrainSection

LABELS = LabelMap(muscle=[1], subcutaneous_fat=[7], visceral_fat=[5], background=[2])


def _rows(root: Path) -> list[dict[str, str]]:
    import csv

    with (root / "manifest.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


# ------------------------------------------------------------------ map_labels
def test_map_labels_maps_every_declared_value() -> None:
    raw = np.array([[0, 1, 2], [5, 7, 1]])
    out = map_labels(raw, LABELS, Path("m.png"))
    assert out.dtype == np.uint8
    assert out.tolist() == [[0, 1, 0], [3, 2, 1]]


def test_map_labels_names_file_and_undeclared_values() -> None:
    with pytest.raises(SliceError) as info:
        map_labels(np.array([[0, 1, 9], [13, 9, 7]]), LABELS, Path("labels/p01.png"))
    error = info.value
    assert error.reason is R.undeclared_label_value
    assert "labels/p01.png" in str(error) and "9, 13" in error.detail and "site.toml [labels]" in error.detail


# ------------------------------------------------------------------ folder errors
def test_valid_site_loads(tmp_path: Path) -> None:
    site = load_site(make_site(tmp_path, n=3, size=32))
    assert len(site) == 3 and site.n_listed == 3 and site.name == "test-site"
    assert site.rows[1].height_m == pytest.approx(1.65) and site.rows[1].sex == "F"
    assert site.lines == [2, 3, 4]


def test_missing_folder_and_site_toml(tmp_path: Path) -> None:
    with pytest.raises(SiteFolderError, match="does not exist"):
        load_site(tmp_path / "absent")
    root = make_site(tmp_path, n=1, size=16)
    (root / "site.toml").unlink()
    with pytest.raises(SiteFolderError, match=r"site.toml is missing.*\[labels\]"):
        load_site(root)


def test_bad_toml_and_contract_violation_name_the_field(tmp_path: Path) -> None:
    root = make_site(tmp_path, n=1, size=16)
    (root / "site.toml").write_text('name = "x"\n[labels\nmuscle = [1]\n')
    with pytest.raises(SiteFolderError, match="not valid TOML"):
        load_site(root)
    (root / "site.toml").write_text('name = "x"\n[labels]\nmuscle = [1]\nsubcutaneous_fat = [7]\n')
    with pytest.raises(SiteFolderError, match=r"labels\.visceral_fat: Field required"):
        load_site(root)
    (root / "site.toml").write_text(
        'name = "x"\n[labels]\nmuscle = [1]\nsubcutaneous_fat = [1]\nvisceral_fat = [5]\n'
    )
    with pytest.raises(SiteFolderError, match="declared for both"):
        load_site(root)


def test_manifest_problems(tmp_path: Path) -> None:
    root = make_site(tmp_path, n=1, size=16)
    (root / "manifest.csv").unlink()
    with pytest.raises(SiteFolderError, match=r"manifest\.csv is missing"):
        load_site(root)
    (root / "manifest.csv").write_text("image,mask\nct/slice_0.dcm,labels/slice_0.png\n")
    with pytest.raises(SiteFolderError, match=r"no column 'label' \(found columns: image, mask\)"):
        load_site(root)
    (root / "manifest.csv").write_text("image,label\n\n")
    with pytest.raises(SiteFolderError, match="lists no slices"):
        load_site(root)


def test_excel_style_manifest_with_bom_semicolons_and_capitals(tmp_path: Path) -> None:
    root = make_site(tmp_path, n=1, size=16)
    (root / "manifest.csv").write_bytes(
        "\ufeffImage;Label;Height_m\nct/slice_0.dcm;labels/slice_0.png;1.7\n".encode()
    )
    site = load_site(root)
    assert site.rows[0].image == "ct/slice_0.dcm" and site.rows[0].height_m == 1.7


def test_invalid_row_is_kept_and_reported_not_fatal(tmp_path: Path) -> None:
    root = make_site(tmp_path, n=2, size=16)
    rows = _rows(root)
    rows[0]["height_m"] = "abc"
    write_manifest(root, rows)
    site = load_site(root)
    assert len(site) == 1 and site.n_listed == 2
    assert site.invalid_rows[0].line == 2 and "height_m" in site.invalid_rows[0].detail
    items = list(iter_slices(site))
    assert len(items) == 2
    assert isinstance(items[0], LoadedSlice)
    assert isinstance(items[1], SliceError) and items[1].reason is INVALID_ROW_REASON
    assert "line 2" in items[1].detail and "'abc'" in items[1].detail


# ------------------------------------------------------------------ slices
def test_load_slice_fields(tmp_path: Path) -> None:
    root = make_site(tmp_path, n=2, size=32, with_reference=True)
    site = load_site(root)
    item = load_slice(site, 1, with_reference=True)
    assert item.label.dtype == np.uint8 and set(np.unique(item.label)) == {0, 1, 2, 3}
    assert item.ct.hu.shape == (32, 32) and item.group == "patient-1"
    assert item.height_m == pytest.approx(1.65) and item.sex == "F"
    assert item.label_values == (0, 1, 2, 5, 7)
    assert item.reference is not None
    # the reference relabels IMAT (2, background) as muscle: more muscle, nothing else changes
    assert (item.reference == 1).sum() > (item.label == 1).sum()
    assert load_slice(site, 1).reference is None


def test_height_and_sex_fall_back_to_dicom_and_group_to_image(tmp_path: Path) -> None:
    root = make_site(tmp_path, n=1, size=16, with_height=False)
    write_ct_slice(
        root / "ct" / "slice_0.dcm",
        np.zeros((16, 16)),
        spacing_mm=(1, 1),
        extra={"PatientSize": "1.81", "PatientSex": "M"},
    )
    rows = _rows(root)
    rows[0].update(group="", sex="")
    write_manifest(root, rows)
    item = load_slice(load_site(root), 0)
    assert item.height_m == pytest.approx(1.81) and item.sex == "M" and item.group == "image:ct/slice_0.dcm"


def test_a_row_without_group_is_keyed_by_its_image_not_its_position(tmp_path: Path) -> None:
    """Reordering an ungrouped manifest keeps every slice's patient key (and so its split part);
    replacing a row's image gives it a new key (the release ledger sees a new patient)."""
    root = make_site(tmp_path, n=8, size=16)
    rows = [{**row, "group": ""} for row in _rows(root)]
    write_manifest(root, rows)
    site = load_site(root)
    keys = {site.rows[i].image: row_group(site, i) for i in range(len(site.rows))}
    write_manifest(root, list(reversed(rows)))
    reordered = load_site(root)
    assert {reordered.rows[i].image: row_group(reordered, i) for i in range(8)} == keys
    train = TrainSection(val_fraction=0.25, test_fraction=0.25, seed=0)
    test_images = {site.rows[i].image for i in split_site(site, train).test}
    assert test_images and test_images == {reordered.rows[i].image for i in split_site(reordered, train).test}
    rows[0]["image"], rows[1]["image"] = rows[1]["image"], rows[0]["image"]
    write_manifest(root, rows)
    swapped = load_site(root)
    assert row_group(swapped, 0) == keys[swapped.rows[0].image] != keys[site.rows[0].image]


def _single_row_site(tmp_path: Path, mask: np.ndarray, **row: str) -> Path:
    root = make_site(tmp_path, n=1, size=16)
    write_mask(root / "labels" / "slice_0.png", mask)
    rows = _rows(root)
    rows[0].update(row)
    write_manifest(root, rows)
    return root


def test_shape_mismatch(tmp_path: Path) -> None:
    root = _single_row_site(tmp_path, np.ones((16, 12), dtype=np.int64))
    with pytest.raises(SliceError, match=r"mask is 16x12 but the image slice_0.dcm is 16x16") as info:
        load_slice(load_site(root), 0)
    assert info.value.reason is R.shape_mismatch


def test_empty_mask_after_mapping(tmp_path: Path) -> None:
    root = _single_row_site(tmp_path, np.full((16, 16), 2))  # only IMAT, declared background
    with pytest.raises(SliceError, match="values found: 2") as info:
        load_slice(load_site(root), 0)
    assert info.value.reason is R.empty_mask


def test_undeclared_value_through_load_slice(tmp_path: Path) -> None:
    root = _single_row_site(tmp_path, np.full((16, 16), 4))
    with pytest.raises(SliceError) as info:
        load_slice(load_site(root), 0)
    assert info.value.reason is R.undeclared_label_value and info.value.path.name == "slice_0.png"


@pytest.mark.parametrize("reference", ["references/absent.npy", "labels/slice_0.png.bad"])
def test_reference_problems_are_unreadable_reference(tmp_path: Path, reference: str) -> None:
    root = make_site(tmp_path, n=1, size=16)
    (root / "labels" / "slice_0.png.bad").write_bytes(b"junk")
    rows = _rows(root)
    rows[0]["reference"] = reference
    write_manifest(root, rows)
    site = load_site(root)
    with pytest.raises(SliceError) as info:
        load_slice(site, 0, with_reference=True)
    assert info.value.reason is R.unreadable_reference and info.value.detail.startswith("reference mask:")
    assert load_slice(site, 0).reference is None  # not asked for: the slice is still usable


def test_reference_with_other_shape_is_unreadable_reference(tmp_path: Path) -> None:
    root = make_site(tmp_path, n=1, size=16)
    write_mask(root / "ref.npy", np.ones((8, 8), dtype=np.int64))
    rows = _rows(root)
    rows[0]["reference"] = "ref.npy"
    write_manifest(root, rows)
    with pytest.raises(SliceError, match="8x8") as info:
        load_slice(load_site(root), 0, with_reference=True)
    assert info.value.reason is R.unreadable_reference


@pytest.mark.parametrize(
    "image", ["../outside.dcm", "ct/../../outside.dcm", "/etc/passwd", "C:\\data\\x.dcm"]
)
def test_paths_escaping_the_site_are_refused(tmp_path: Path, image: str) -> None:
    root = make_site(tmp_path, n=1, size=16)
    shutil.copy(root / "ct" / "slice_0.dcm", tmp_path / "outside.dcm")
    rows = _rows(root)
    rows[0]["image"] = image
    write_manifest(root, rows)
    with pytest.raises(SliceError, match="site folder") as info:
        load_slice(load_site(root), 0)
    assert info.value.reason is R.missing_file


def test_windows_separators_inside_the_site_work(tmp_path: Path) -> None:
    root = make_site(tmp_path, n=1, size=16)
    rows = _rows(root)
    rows[0]["image"] = "ct\\slice_0.dcm"
    write_manifest(root, rows)
    assert load_slice(load_site(root), 0).ct.hu.shape == (16, 16)


# ------------------------------------------------------------------ fingerprint
def test_fingerprint_ignores_names_but_not_content_or_labels(tmp_path: Path) -> None:
    root = make_site(tmp_path, n=2, size=16)
    before = dataset_fingerprint(load_site(root))
    assert len(before) == 16
    (root / "ct" / "slice_0.dcm").rename(root / "ct" / "renamed.dcm")
    rows = _rows(root)
    rows[0]["image"] = "ct/renamed.dcm"
    rows.reverse()
    write_manifest(root, rows)
    assert dataset_fingerprint(load_site(root)) == before  # names and row order do not matter

    toml = (root / "site.toml").read_text()
    (root / "site.toml").write_text(toml.replace("background = [2]", "background = [2, 3]"))
    assert dataset_fingerprint(load_site(root)) != before
    (root / "site.toml").write_text(toml)

    mask = np.zeros((16, 16), dtype=np.int64)
    mask[4:8, 4:8] = 1
    write_mask(root / "labels" / "slice_1.png", mask)
    assert dataset_fingerprint(load_site(root)) != before
