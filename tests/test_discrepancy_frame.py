"""Body-relative frame: spine, anterior and region naming from the image alone."""

from __future__ import annotations

import math

import numpy as np
import pytest
from discrepancy_toy import toy_slice

from common.discrepancy.frame import ABDOMINAL_WALL, PARASPINAL, PSOAS, body_frame


def _share(frame, mask: np.ndarray, code: int) -> float:
    rows, cols = np.nonzero(mask)
    return float((frame.regions(rows, cols) == code).mean())


@pytest.mark.parametrize(
    "pose",
    [
        {},
        {"angle_deg": 20.0},
        {"angle_deg": -25.0, "shift_mm": (15.0, -25.0)},
        {"prone": True},
        {"prone": True, "angle_deg": 10.0, "noise_sd": 10.0},
    ],
    ids=["supine", "rotated", "rotated-off-centre", "prone", "prone-rotated-noisy"],
)
def test_regions_follow_the_patient_not_the_image(pose: dict) -> None:
    toy = toy_slice(**pose)
    frame = body_frame(toy.hu, toy.spacing)
    assert frame.spine_found
    t = math.radians(pose.get("angle_deg", 0.0) + (180.0 if pose.get("prone") else 0.0))
    expected = (-math.cos(t), math.sin(t))  # the toy's anterior axis in (row, col)
    assert frame.anterior[0] * expected[0] + frame.anterior[1] * expected[1] > math.cos(math.radians(8))
    assert _share(frame, toy.psoas, PSOAS) > 0.95
    assert _share(frame, toy.paraspinal, PARASPINAL) > 0.9
    assert _share(frame, toy.wall, ABDOMINAL_WALL) > 0.95


def test_polar_angle_zero_is_anterior_and_radius_reaches_the_outline() -> None:
    toy = toy_slice(prone=True)  # anterior is image-down here
    frame = body_frame(toy.hu, toy.spacing)
    rows, cols = np.nonzero(frame.body)
    angle, radius = frame.polar(rows, cols)
    front = rows == rows.max()  # lowest image rows = most anterior for a prone patient
    assert np.all((angle[front] < 20) | (angle[front] > 340))
    assert radius.max() == pytest.approx(1.0, abs=0.05)
    assert 0.0 <= radius.min() < 0.1


def test_without_bone_the_frame_falls_back_to_image_up() -> None:
    toy = toy_slice()
    hu = np.where(toy.hu > 150, 40.0, toy.hu).astype(np.float32)
    frame = body_frame(hu, toy.spacing)
    assert not frame.spine_found
    assert frame.anterior == (-1.0, 0.0)


def test_an_image_without_body_is_refused() -> None:
    with pytest.raises(ValueError, match="no body"):
        body_frame(np.full((32, 32), -1000.0, dtype=np.float32), (1.0, 1.0))
