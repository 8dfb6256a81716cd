"""Mask formats: exact round trips, axis conventions and clear refusals."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from common.dicom_io import write_ct_slice
from common.errors import SliceError
from common.masks import read_mask, write_mask
from protocols.classes import ExclusionReason as R

# Not square, not symmetric: a transposed or flipped read cannot pass.
MASK = np.zeros((6, 9), dtype=np.int64)
MASK[0, :3] = 1
MASK[1:4, 5] = 7
MASK[4, 1] = 5
MASK[5, 8] = 2


@pytest.fixture
def ct(tmp_path: Path) -> Path:
    return write_ct_slice(tmp_path / "ct.dcm", np.zeros(MASK.shape), spacing_mm=(0.7, 0.8))


@pytest.mark.parametrize("suffix", [".png", ".npy", ".nii", ".nii.gz", ".tag", ".dcm"])
def test_round_trip_is_exact(tmp_path: Path, ct: Path, suffix: str) -> None:
    path = write_mask(tmp_path / f"mask{suffix}", MASK, ct_path=ct)
    out = read_mask(path, ct_path=ct)
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, MASK)


@pytest.mark.parametrize("suffix", [".png", ".npy", ".nii.gz"])
def test_sixteen_bit_values_round_trip(tmp_path: Path, suffix: str) -> None:
    mask = MASK * 1000  # up to 7000: needs 16 bits
    np.testing.assert_array_equal(read_mask(write_mask(tmp_path / f"m{suffix}", mask)), mask)
    if suffix == ".png":
        assert Image.open(tmp_path / "m.png").mode.startswith("I")


def test_png_rgb_with_equal_channels_is_accepted(tmp_path: Path) -> None:
    Image.fromarray(np.repeat(MASK.astype(np.uint8)[..., None], 3, axis=2), mode="RGB").save(
        tmp_path / "g.png"
    )
    np.testing.assert_array_equal(read_mask(tmp_path / "g.png"), MASK)


def test_png_colour_is_refused(tmp_path: Path) -> None:
    rgb = np.zeros((*MASK.shape, 3), dtype=np.uint8)
    rgb[..., 0] = MASK
    Image.fromarray(rgb, mode="RGB").save(tmp_path / "c.png")
    with pytest.raises(SliceError, match="grayscale") as info:
        read_mask(tmp_path / "c.png")
    assert info.value.reason is R.unreadable_label


def test_nifti_is_stored_transposed(tmp_path: Path, ct: Path) -> None:
    path = write_mask(tmp_path / "m.nii.gz", MASK, ct_path=ct)
    image = nib.load(str(path))
    data = np.asanyarray(image.dataobj)
    assert data.shape == (9, 6, 1)  # (columns, rows, 1): first NIfTI axis is patient x
    np.testing.assert_array_equal(data[:, :, 0], MASK.T)
    np.testing.assert_allclose(np.diag(image.affine)[:3], [-0.8, -0.7, 1.0])
    assert nib.aff2axcodes(image.affine) == ("L", "P", "S")


def test_nifti_with_rows_flipped_dcm2niix_style_is_reoriented(tmp_path: Path) -> None:
    # dcm2niix stores rows bottom-up with an anterior-pointing second axis.
    data = MASK.T[:, ::-1].astype(np.uint8)
    image = nib.Nifti1Image(data, np.diag([-0.8, 0.7, 1.0, 1.0]))
    image.set_qform(image.affine, code=1)
    nib.save(image, str(tmp_path / "flip.nii"))
    np.testing.assert_array_equal(read_mask(tmp_path / "flip.nii"), MASK)


def test_nifti_without_orientation_is_plain_transpose(tmp_path: Path) -> None:
    image = nib.Nifti1Image(MASK.T.astype(np.int16), None)
    assert int(image.header["sform_code"]) == 0 and int(image.header["qform_code"]) == 0
    nib.save(image, str(tmp_path / "plain.nii"))
    np.testing.assert_array_equal(read_mask(tmp_path / "plain.nii"), MASK)


def test_npy_float_with_fractions_is_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "f.npy", MASK.astype(np.float32) + 0.5)
    with pytest.raises(SliceError, match="non-integer"):
        read_mask(tmp_path / "f.npy")
    np.save(tmp_path / "w.npy", MASK.astype(np.float32))
    np.testing.assert_array_equal(read_mask(tmp_path / "w.npy"), MASK)


def test_npy_hxwx1_is_accepted_and_volume_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", MASK[..., None])
    np.testing.assert_array_equal(read_mask(tmp_path / "a.npy"), MASK)
    np.save(tmp_path / "v.npy", np.stack([MASK, MASK]))
    with pytest.raises(SliceError, match=r"shape \(2, 6, 9\)"):
        read_mask(tmp_path / "v.npy")


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("broken.png", b"\x89PNG not really", R.unreadable_label),
        ("broken.nii.gz", b"garbage", R.unreadable_label),
        ("mask.bmp", b"BM", R.unreadable_label),
    ],
)
def test_unreadable_masks_raise_slice_error(tmp_path: Path, name: str, content: bytes, reason: R) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(SliceError) as info:
        read_mask(tmp_path / name)
    assert info.value.reason is reason and info.value.path == tmp_path / name


def test_missing_mask_is_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SliceError) as info:
        read_mask(tmp_path / "absent.png")
    assert info.value.reason is R.missing_file


# ------------------------------------------------------------------ DICOM SEG
def test_seg_uses_integer_labels_as_values(tmp_path: Path, ct: Path) -> None:
    path = write_mask(tmp_path / "s.dcm", MASK, ct_path=ct)
    ds = pydicom.dcmread(path)
    assert ds.Modality == "SEG" and ds.SegmentationType == "BINARY"
    assert [s.SegmentLabel for s in ds.SegmentSequence] == ["1", "2", "5", "7"]
    assert [s.SegmentNumber for s in ds.SegmentSequence] == [1, 2, 3, 4]


def test_seg_with_named_segments_uses_segment_numbers(tmp_path: Path, ct: Path) -> None:
    path = write_mask(tmp_path / "s.dcm", MASK, ct_path=ct)
    ds = pydicom.dcmread(path)
    for item, name in zip(ds.SegmentSequence, ["Muscle", "IMAT", "VAT", "SAT"], strict=True):
        item.SegmentLabel = name
    ds.save_as(path)
    expected = np.select([MASK == 1, MASK == 2, MASK == 5, MASK == 7], [1, 2, 3, 4], 0)
    np.testing.assert_array_equal(read_mask(path, ct_path=ct), expected)


def test_seg_drawn_on_another_image_is_refused(tmp_path: Path, ct: Path) -> None:
    seg = write_mask(tmp_path / "s.dcm", MASK, ct_path=ct)
    other = write_ct_slice(tmp_path / "other.dcm", np.zeros(MASK.shape), spacing_mm=(0.7, 0.8))
    with pytest.raises(SliceError, match="another image") as info:
        read_mask(seg, ct_path=other)
    assert info.value.reason is R.unreadable_label
    bigger = write_ct_slice(tmp_path / "big.dcm", np.zeros((8, 9)), spacing_mm=(0.7, 0.8))
    with pytest.raises(SliceError, match="6x9"):
        read_mask(seg, ct_path=bigger)


def test_reads_pydicom_liver_seg() -> None:
    path = Path(get_testdata_file("liver_1frame.dcm"))
    mask = read_mask(path)
    assert mask.shape == (512, 512)
    assert set(np.unique(mask).tolist()) == {0, 1}  # segment 1 'Liver' (not an integer label)
    assert int(mask.sum()) == int(pydicom.dcmread(path).pixel_array.sum())


def test_seg_needs_the_ct_to_be_written(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ct_path"):
        write_mask(tmp_path / "s.dcm", MASK)


def test_seg_with_overlapping_segments_is_refused(tmp_path: Path, ct: Path) -> None:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    stack = np.zeros((1, *MASK.shape, 2), dtype=np.uint8)
    stack[0, :3, :3, 0] = 1
    stack[0, 2:5, 2:5, 1] = 1  # overlaps segment 1 at (2, 2)
    segments = [
        hd.seg.SegmentDescription(
            segment_number=n,
            segment_label=label,
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type="MANUAL",
        )
        for n, label in ((1, "1"), (2, "7"))
    ]
    seg = hd.seg.Segmentation(
        source_images=[pydicom.dcmread(ct)],
        pixel_array=stack,
        segmentation_type="BINARY",
        segment_descriptions=segments,
        series_instance_uid=hd.UID(),
        series_number=1,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="test",
        manufacturer_model_name="test",
        software_versions="0",
        device_serial_number="0",
    )
    seg.save_as(tmp_path / "overlap.dcm")
    with pytest.raises(SliceError, match="overlap at 1 pixels") as info:
        read_mask(tmp_path / "overlap.dcm", ct_path=ct)
    assert info.value.reason is R.unreadable_label
