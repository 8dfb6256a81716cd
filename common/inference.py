"""Segment CT slices with a study model: canonical masks at each slice's native shape."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from common.device import Compute, inference
from common.model import ModelSpec
from common.preprocess import logits_to_native, to_model_input

log = logging.getLogger(__name__)


def predict_masks(
    model: torch.nn.Module,
    spec: ModelSpec,
    hu_images: Sequence[np.ndarray],
    *,
    batch_size: int = 4,
    progress: bool = False,
    compute: Compute | None = None,
) -> list[np.ndarray]:
    """One uint8 canonical mask (0 background .. 3 visceral fat) per HU slice, at its native shape.

    Slices are windowed and resized to ``spec.image_size``, run through ``model`` in eval mode
    under ``torch.inference_mode()`` in batches of ``batch_size``, and the logits are
    upsampled back to each slice's own shape before the argmax. The model's train/eval
    mode is restored afterwards.

    ``compute`` (``common.device``): the model is moved to its device and memory format (in
    place, and left there) and the forward pass runs under its autocast; the logits are
    upsampled and argmax-ed in float32. ``None``: fp32 on the device the model is on.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    total = len(hu_images)
    masks: list[np.ndarray] = []
    bar = None
    if progress and total:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="segment", unit="slice")
    was_training = model.training
    if compute is None:
        compute = Compute.of_model(model)
    else:
        compute.prepare(model)
    model.eval()
    try:
        with inference(compute):
            for start in range(0, total, batch_size):
                chunk = hu_images[start : start + batch_size]
                batch = torch.stack([to_model_input(hu, spec.image_size, spec.hu_window) for hu in chunk])
                logits = model(compute.batch(batch)).float()
                if logits.shape[1] != spec.classes:
                    raise ValueError(f"model returned {logits.shape[1]} classes, spec says {spec.classes}")
                masks += [logits_to_native(lg, np.shape(hu)) for lg, hu in zip(logits, chunk, strict=True)]
                if bar is not None:
                    bar.update(len(chunk))
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    log.debug("segmented %d slices at %d px", total, spec.image_size)
    return masks
