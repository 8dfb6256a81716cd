"""Toys for the training tests: a hand-made CT slice and a tiny BatchNorm network.

:func:`phantom` is a 64-px slice of concentric ellipses (subcutaneous fat ring, muscle ring,
visceral fat core, in air) whose centre and radii vary with the seed; :class:`Tiny` is a
two-conv network with one BatchNorm, a cheap stand-in for the U-Net.
"""

from __future__ import annotations

import numpy as np
import torch

from common.training import TrainSample


def phantom(seed: int, size: int = 64) -> TrainSample:
    """Concentric ellipses: subcutaneous fat ring, muscle ring, visceral fat core, in air."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    cy, cx = size / 2 + rng.uniform(-3, 3), size / 2 + rng.uniform(-3, 3)
    ry, rx = size * rng.uniform(0.30, 0.40), size * rng.uniform(0.38, 0.46)
    r = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
    label = np.zeros((size, size), dtype=np.uint8)
    label[r < 1.0] = 2
    label[r < 0.8] = 1
    label[r < 0.6] = 3
    hu = np.choose(label, [-1000.0, 50.0, -100.0, -90.0]).astype(np.float32)
    hu += rng.normal(0, 10, size=hu.shape).astype(np.float32)
    return TrainSample(hu=hu, label=label, group=f"p{seed}")


class Tiny(torch.nn.Module):
    """Conv -> BatchNorm -> ReLU -> Conv (4 classes): the BatchNorm's input is the first conv's output."""

    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(1, hidden, 3, padding=1),
            torch.nn.BatchNorm2d(hidden),
            torch.nn.ReLU(),
            torch.nn.Conv2d(hidden, 4, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
