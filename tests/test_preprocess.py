"""common.preprocess: HU window, resizing to the model and back to native pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.preprocess import logits_to_native, mask_to_size, normalise_hu, to_model_input


def test_normalise_hu_window_edges_and_tissues() -> None:
    hu = np.array([[-1000.0, -250.0, 0.0], [250.0, 1000.0, -100.0]])
    out = normalise_hu(hu, (-250.0, 250.0))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.0, 0.0, 0.5], [1.0, 1.0, 0.3]], atol=1e-6)
    fat, muscle = normalise_hu(np.array([[-100.0, 50.0]]))[0]
    assert fat < 0.4 < 0.5 < muscle  # default window keeps fat below water, muscle above


def test_normalise_hu_rejects_reversed_window() -> None:
    with pytest.raises(ValueError, match="low < high"):
        normalise_hu(np.zeros((2, 2)), (100.0, -100.0))


def test_to_model_input_shape_range_and_downsampling() -> None:
    hu = np.full((100, 60), -1000.0, dtype=np.float32)
    hu[:50] = 250.0  # top half bright, bottom half air
    x = to_model_input(hu, 32)
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert float(x[0, 0, 0]) == pytest.approx(1.0) and float(x[0, -1, -1]) == pytest.approx(0.0)


def test_to_model_input_same_size_is_plain_normalisation() -> None:
    hu = np.linspace(-300, 300, 64 * 64, dtype=np.float32).reshape(64, 64)
    np.testing.assert_array_equal(to_model_input(hu, 64)[0].numpy(), normalise_hu(hu))


def test_to_model_input_rejects_non_2d() -> None:
    with pytest.raises(ValueError, match=r"2-D.*\(1, 4, 4\)"):
        to_model_input(np.zeros((1, 4, 4)), 32)


def test_mask_to_size_nearest_keeps_values_and_layout() -> None:
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[:4, :4] = 1
    mask[4:, 4:] = 3
    small = mask_to_size(mask, 4)
    assert small.dtype == torch.int64
    expected = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 3, 3], [0, 0, 3, 3]])
    np.testing.assert_array_equal(small.numpy(), expected)
    big = mask_to_size(mask, 16)
    assert set(np.unique(big.numpy())) == {0, 1, 3}  # no interpolated in-between labels
    assert int((big == 3).sum()) == 64


def test_logits_to_native_returns_native_shape_and_argmax() -> None:
    logits = torch.zeros(4, 8, 8)
    logits[2, :, :4] = 5.0  # left half class 2
    logits[1, :, 4:] = 5.0  # right half class 1
    out = logits_to_native(logits, (30, 20))
    assert out.shape == (30, 20) and out.dtype == np.uint8
    assert (out[:, :9] == 2).all() and (out[:, 11:] == 1).all()


def test_round_trip_mask_through_model_size() -> None:
    """A mask -> one-hot logits at model size -> native recovers the mask away from edges."""
    mask = np.zeros((50, 70), dtype=np.uint8)
    mask[10:40, 10:35] = 1
    mask[10:40, 35:60] = 2
    small = mask_to_size(mask, 32)
    logits = torch.nn.functional.one_hot(small, 4).permute(2, 0, 1).float() * 10
    native = logits_to_native(logits, mask.shape)
    assert native.shape == mask.shape
    assert (native == mask).mean() > 0.95
