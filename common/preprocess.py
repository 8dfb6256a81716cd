"""From a native CT slice to the network's input, and from its output back to native pixels.

The network sees a square ``S x S`` image (``ModelSpec.image_size``): HU clipped to a window
and scaled to [0, 1], then resized (bilinear, antialiased when shrinking). A non-square slice
is stretched to the square and stretched back, so every prediction lines up pixel for pixel
with the native image. Metrics and areas are always computed at native resolution with the
native pixel spacing: :func:`logits_to_native` upsamples the *logits* (not a label map)
before the argmax, which gives smooth native-resolution contours.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from common.model import DEFAULT_HU_WINDOW


def _check_2d(array: np.ndarray, what: str) -> None:
    if array.ndim != 2 or 0 in array.shape:
        raise ValueError(f"{what} must be a non-empty 2-D array (H x W), got shape {array.shape}")


def _check_size(size: int) -> None:
    if size < 1:
        raise ValueError(f"model image size must be positive, got {size}")


def normalise_hu(hu: np.ndarray, window: tuple[float, float] = DEFAULT_HU_WINDOW) -> np.ndarray:
    """HU clipped to ``window = (low, high)`` and mapped linearly to float32 [0, 1].

    The default -250..+250 keeps fat (-190..-30) and muscle (-29..+150) apart and unclipped.
    """
    low, high = float(window[0]), float(window[1])
    if not low < high:
        raise ValueError(f"HU window must be (low, high) with low < high, got {window}")
    scaled = (np.asarray(hu, dtype=np.float32) - np.float32(low)) / np.float32(high - low)
    return np.clip(scaled, 0.0, 1.0).astype(np.float32, copy=False)


def to_model_input(
    hu: np.ndarray, size: int, window: tuple[float, float] = DEFAULT_HU_WINDOW
) -> torch.Tensor:
    """A ``1 x size x size`` float32 tensor: windowed HU, bilinear-resized (antialiased)."""
    _check_2d(hu, "CT slice")
    _check_size(size)
    image = torch.from_numpy(normalise_hu(hu, window))[None, None]
    if image.shape[-2:] != (size, size):
        image = F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return image[0].clamp_(0.0, 1.0)


def mask_to_size(mask: np.ndarray, size: int) -> torch.Tensor:
    """A canonical mask resized to ``size x size`` (nearest neighbour), as an int64 tensor."""
    _check_2d(mask, "mask")
    _check_size(size)
    labels = torch.from_numpy(np.asarray(mask).astype(np.int64, copy=False))
    if labels.shape == (size, size):
        return labels.clone()
    # nearest-exact samples pixel centres; plain "nearest" shifts the mask by up to a pixel.
    resized = F.interpolate(labels[None, None].to(torch.float32), size=(size, size), mode="nearest-exact")
    return resized[0, 0].to(torch.int64)


def logits_to_native(logits: torch.Tensor, shape: tuple[int, int]) -> np.ndarray:
    """Class logits ``C x S x S`` -> uint8 label map at the native ``shape`` (H, W).

    The logits are bilinearly upsampled to ``shape`` and then argmax-ed.
    """
    if logits.ndim != 3:
        raise ValueError(f"logits must be C x S x S, got shape {tuple(logits.shape)}")
    height, width = int(shape[0]), int(shape[1])
    if height < 1 or width < 1:
        raise ValueError(f"native shape must be positive (H, W), got {shape}")
    scores = logits.detach().to(torch.float32)[None]
    if scores.shape[-2:] != (height, width):
        scores = F.interpolate(scores, size=(height, width), mode="bilinear", align_corners=False)
    # numpy's argmax over the class axis is ~8x faster than torch's on CPU (40 ms -> 5 ms at 512 px).
    return scores[0].cpu().numpy().argmax(axis=0).astype(np.uint8)
