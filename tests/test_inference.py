"""common.inference: batched segmentation back at each slice's native shape."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.inference import predict_masks
from common.model import ModelSpec, build_model


class Threshold(torch.nn.Module):
    """Logit of muscle = 20 * (x - 0.5): muscle where HU > 0 under the default window."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 1)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.bias.zero_()
            self.conv.weight[1, 0] = 20.0
            self.conv.bias[1] = -10.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


SPEC = ModelSpec(encoder="resnet18", image_size=32)


def test_masks_are_native_shape_and_follow_the_image() -> None:
    left_bright = np.full((40, 50), -100.0, dtype=np.float32)
    left_bright[:, :25] = 100.0
    top_bright = np.full((64, 64), -100.0, dtype=np.float32)
    top_bright[:32] = 100.0
    model = Threshold().train()
    masks = predict_masks(model, SPEC, [left_bright, top_bright, left_bright], batch_size=2)
    assert [m.shape for m in masks] == [(40, 50), (64, 64), (40, 50)]
    assert all(m.dtype == np.uint8 for m in masks)
    assert (masks[0][:, :23] == 1).all() and (masks[0][:, 27:] == 0).all()
    assert (masks[1][:30] == 1).all() and (masks[1][34:] == 0).all()
    assert model.training  # mode restored


def test_batch_size_does_not_change_predictions() -> None:
    torch.manual_seed(0)
    model = build_model(SPEC)
    rng = np.random.default_rng(0)
    images = [
        rng.uniform(-300, 300, size=shape).astype(np.float32) for shape in [(32, 32), (48, 40), (20, 30)]
    ]
    one = predict_masks(model, SPEC, images, batch_size=1)
    three = predict_masks(model, SPEC, images, batch_size=3)
    for a, b in zip(one, three, strict=True):
        np.testing.assert_array_equal(a, b)
    assert predict_masks(model, SPEC, []) == []


def test_bad_batch_size() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        predict_masks(Threshold(), SPEC, [np.zeros((4, 4))], batch_size=0)
