"""CT slices in HU: real DICOM written and read with pydicom, and pydicom's own test files."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.uid import JPEGLSLossless, RLELossless

from common.dicom_io import AIR_HU, PatientInfo, read_ct_slice, write_ct_slice
from common.errors import SliceError
from protocols.classes import ExclusionReason as R

HU = np.array([[-1024.0, -190.0, -30.0, 0.0], [40.0, 150.0, 1000.0, 2000.0]], dtype=np.float64)


def _write(tmp_path: Path, **kwargs: object) -> Path:
    kwargs.setdefault("spacing_mm", (0.7, 0.8))
    return write_ct_slice(tmp_path / "ct.dcm", HU, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("signed", "slope", "intercept", "stored_first"),
    [
        (True, 1.0, -1024.0, 0),
        (False, 1.0, -1024.0, 0),
        (True, 1.0, 0.0, -1024),
        (True, 0.5, 0.0, -2048),
        (False, 2.0, -1024.0, 0),
        (True, 2.0, -1024.0, 0),
    ],
)
def test_hu_uses_slope_and_intercept(
    tmp_path: Path, signed: bool, slope: float, intercept: float, stored_first: int
) -> None:
    path = _write(tmp_path, signed=signed, slope=slope, intercept=intercept)
    raw = pydicom.dcmread(path)
    assert raw.PixelRepresentation == (1 if signed else 0)
    assert int(raw.pixel_array[0, 0]) == stored_first  # -1024 HU stored as (hu - b) / m
    ct = read_ct_slice(path)
    assert ct.hu.dtype == np.float32
    np.testing.assert_array_equal(ct.hu, HU.astype(np.float32))


def test_unsigned_storage_of_negative_hu_with_zero_intercept_clips(tmp_path: Path) -> None:
    # uint16 with intercept 0 cannot hold negative HU: stored values clip at 0 -> 0 HU.
    ct = read_ct_slice(_write(tmp_path, signed=False, intercept=0.0))
    assert ct.hu[0, 0] == 0.0 and ct.hu[1, 3] == 2000.0


def test_slope_two_halves_resolution_but_keeps_scale(tmp_path: Path) -> None:
    hu = np.array([[-1023.0, 41.0]])
    ct = read_ct_slice(write_ct_slice(tmp_path / "a.dcm", hu, spacing_mm=(1, 1), slope=2.0))
    # stored = round((hu + 1024) / 2) = [0, 532] (banker's rounding of 0.5 and 532.5) -> HU = [-1024, 40]
    np.testing.assert_array_equal(ct.hu, [[-1024.0, 40.0]])


def test_bits_stored_fits_values(tmp_path: Path) -> None:
    ds = pydicom.dcmread(_write(tmp_path, signed=False))
    assert ds.BitsAllocated == 16 and ds.BitsStored == 12 and ds.HighBit == 11  # 0..3024 fits 12 bits
    assert pydicom.dcmread(_write(tmp_path, signed=True)).BitsStored == 13  # signed 12 bits end at 2047
    big = write_ct_slice(tmp_path / "b.dcm", np.array([[-1024.0, 30000.0]]), spacing_mm=(1, 1))
    assert pydicom.dcmread(big).BitsStored == 16


def test_geometry_and_patient_fields(tmp_path: Path) -> None:
    path = _write(tmp_path, patient=PatientInfo(sex="F", height_m=1.62), position_z=-151.5)
    ct = read_ct_slice(path)
    assert ct.spacing_mm == (0.7, 0.8)
    assert ct.pixel_area_cm2 == pytest.approx(0.0056)
    assert ct.sex == "F" and ct.height_m == pytest.approx(1.62)
    assert ct.slice_location == pytest.approx(-151.5)
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == pydicom.uid.CTImageStorage and ds.Modality == "CT"
    assert ct.sop_instance_uid == ds.SOPInstanceUID


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless])
def test_compressed_round_trip(tmp_path: Path, syntax: str) -> None:
    hu = np.random.default_rng(1).integers(-1024, 1500, size=(32, 32)).astype(np.float64)
    path = write_ct_slice(tmp_path / "c.dcm", hu, spacing_mm=(1, 1), transfer_syntax=syntax)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(read_ct_slice(path).hu, hu.astype(np.float32))


def test_implausible_patient_size_is_ignored(tmp_path: Path) -> None:
    ct = read_ct_slice(_write(tmp_path, extra={"PatientSize": "170"}))
    assert ct.height_m is None


def _refused(path: Path) -> SliceError:
    with pytest.raises(SliceError) as info:
        read_ct_slice(path)
    assert info.value.path == path
    return info.value


def test_refuses_missing_file(tmp_path: Path) -> None:
    assert _refused(tmp_path / "nope.dcm").reason is R.missing_file


def test_refuses_text_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.dcm"
    path.write_text("this is not an image\n" * 10)
    error = _refused(path)
    assert error.reason is R.unreadable_image and "not a DICOM" in error.detail


def test_refuses_truncated_pixel_data(tmp_path: Path) -> None:
    path = write_ct_slice(tmp_path / "t.dcm", np.zeros((64, 64)), spacing_mm=(1, 1))
    path.write_bytes(path.read_bytes()[:-4000])
    error = _refused(path)
    assert error.reason is R.unreadable_image and "Explicit VR Little Endian" in error.detail


def test_refuses_corrupt_compressed_data_naming_codec(tmp_path: Path) -> None:
    hu = np.random.default_rng(2).integers(-1024, 1500, size=(32, 32)).astype(np.float64)
    path = write_ct_slice(tmp_path / "j.dcm", hu, spacing_mm=(1, 1), transfer_syntax=JPEGLSLossless)
    ds = pydicom.dcmread(path)
    frame = bytearray(ds.PixelData)
    frame[20:-20] = b"\xff" * (len(frame) - 40)  # garbage inside the JPEG-LS code stream
    ds.PixelData = bytes(frame)
    ds.save_as(path)
    error = _refused(path)
    assert error.reason is R.unreadable_image and "JPEG-LS Lossless" in error.detail


def test_refuses_not_ct_naming_modality(tmp_path: Path) -> None:
    error = _refused(_write(tmp_path, extra={"Modality": "MR"}))
    assert error.reason is R.not_ct and "'MR'" in error.detail


def test_refuses_multi_frame(tmp_path: Path) -> None:
    error = _refused(_write(tmp_path, extra={"NumberOfFrames": 3}))
    assert error.reason is R.multi_frame and "3" in error.detail


def test_refuses_sagittal_but_accepts_small_tilt(tmp_path: Path) -> None:
    sagittal = _write(tmp_path, extra={"ImageOrientationPatient": [0, 1, 0, 0, 0, -1]})
    error = _refused(sagittal)
    assert error.reason is R.not_axial and "0, 1, 0, 0, 0, -1" in error.detail
    tilt = np.radians(8)
    tilted = _write(tmp_path, extra={"ImageOrientationPatient": [1, 0, 0, 0, np.cos(tilt), -np.sin(tilt)]})
    assert read_ct_slice(tilted).hu.shape == HU.shape


def test_missing_orientation_is_accepted_with_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _write(tmp_path)
    ds = pydicom.dcmread(path)
    del ds.ImageOrientationPatient
    ds.save_as(path)
    with caplog.at_level(logging.WARNING, logger="common.dicom_io"):
        read_ct_slice(path)
    assert "ImageOrientationPatient" in caplog.text


@pytest.mark.parametrize(
    ("element", "reason"), [("PixelData", R.no_pixel_data), ("PixelSpacing", R.no_pixel_spacing)]
)
def test_refuses_missing_element(tmp_path: Path, element: str, reason: R) -> None:
    path = _write(tmp_path)
    ds = pydicom.dcmread(path)
    delattr(ds, element)
    ds.save_as(path)
    assert _refused(path).reason is reason


def test_refuses_rgb_ct(tmp_path: Path) -> None:
    path = _write(tmp_path, extra={"SamplesPerPixel": 3, "PhotometricInterpretation": "RGB"})
    error = _refused(path)
    assert error.reason is R.unreadable_image and "SamplesPerPixel is 3" in error.detail


# ------------------------------------------------------------------ pydicom's test files
def test_reads_pydicom_ct_small_like_an_independent_computation() -> None:
    path = Path(get_testdata_file("CT_small.dcm"))
    ds = pydicom.dcmread(path)
    expected = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    ct = read_ct_slice(path)
    np.testing.assert_array_equal(ct.hu, expected.astype(np.float32))
    assert ct.spacing_mm == pytest.approx((0.661468, 0.661468))


def test_reads_jpeg2000_ct() -> None:
    ct = read_ct_slice(Path(get_testdata_file("693_J2KI.dcm")))
    assert ct.hu.shape == (512, 512)
    assert float(np.median(ct.hu)) == pytest.approx(-1024 + 68, abs=1)  # median stored value is 68


def test_pixel_padding_becomes_air(tmp_path: Path) -> None:
    hu = np.array([[-2000.0, -100.0]])
    path = write_ct_slice(
        tmp_path / "p.dcm", hu, spacing_mm=(1, 1), intercept=0.0, extra={"PixelPaddingValue": -2000}
    )
    np.testing.assert_array_equal(read_ct_slice(path).hu, [[AIR_HU, -100.0]])


EXPECTED = {
    "CT_small.dcm": None,
    "693_J2KI.dcm": None,
    "J2K_pixelrep_mismatch.dcm": R.not_axial,  # 22 degrees oblique
    "MR_small_RLE.dcm": R.not_ct,
    "JPEG2000.dcm": R.not_ct,  # NM
    "SC_rgb_rle.dcm": R.not_ct,
    "SC_rgb_jpeg_dcmtk.dcm": R.not_ct,
    "liver_1frame.dcm": R.not_ct,  # a SEG
    "rtdose.dcm": R.not_ct,
    "README.txt": R.unreadable_image,
    "no_meta.dcm": R.unreadable_image,  # a lone element, no image
}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom complains about its own odd files
def test_every_pydicom_test_file_is_read_or_refused_with_a_reason() -> None:
    outcomes: dict[str, R | None] = {}
    for name in get_testdata_files():
        path = Path(name)
        if path.is_dir():
            continue
        try:
            read_ct_slice(path)
            outcomes[path.name] = None
        except SliceError as exc:  # anything else is a crash and fails the test
            assert exc.detail and str(path) in str(exc)
            outcomes[path.name] = exc.reason
    for name, reason in EXPECTED.items():
        assert outcomes[name] == reason, name
    # the DICOMDIR test tree holds CT files without pixel data and 16x16 CT slices with it
    assert outcomes["IM000000"] is R.no_pixel_data
    assert sum(1 for r in outcomes.values() if r is None) >= 10
