"""Segment CT slices with a study model: canonical masks at each slice's native shape."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from common.device import Compute, inference
from common.model import ModelSpec
from common.preprocess import logits_to_native, to_model_input

log = logging.getLogger(__name__)


#: A forward pass: a float32 model-input batch (N x C x S x S) -> class logits (N x classes x S x S).
Forward = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Segmenter:
    """A study model ready to segment: its forward pass, built once, and the compute it runs on.

    ``compute`` is what is really used (a site's reply says it): ONNX Runtime when asked for
    and the job is large enough (``Compute.for_slices``) and the export worked, else PyTorch.
    """

    model: torch.nn.Module
    spec: ModelSpec
    compute: Compute
    forward: Forward

    @classmethod
    def build(
        cls, model: torch.nn.Module, spec: ModelSpec, compute: Compute | None, *, slices: int
    ) -> Segmenter:
        """``compute`` for a job of ``slices`` slices (``None``: fp32 on the model's device, as it is)."""
        if compute is None:
            compute = Compute.of_model(model)
        else:
            compute = compute.for_slices(slices)
            compute.prepare(model)
        forward: Forward | None = None
        if compute.runtime == "onnxruntime":
            from common.onnx_forward import try_onnx_forward

            forward = try_onnx_forward(model, spec.image_size, spec.in_channels)
            if forward is None:
                compute = compute.with_torch()
        if forward is None:
            forward = _torch_forward(model, compute)
        return cls(model=model, spec=spec, compute=compute, forward=forward)

    def __call__(
        self, hu_images: Sequence[np.ndarray], *, batch_size: int = 4, progress: bool = False
    ) -> list[np.ndarray]:
        """One uint8 canonical mask (0 background .. 3 visceral fat) per HU slice, at its native shape.

        Slices are windowed and resized to ``spec.image_size``, run through the forward pass in
        eval mode under ``torch.inference_mode()`` and the compute's autocast, in batches of
        ``batch_size``; the logits are upsampled back to each slice's own shape in float32
        before the argmax. The model's train/eval mode is restored afterwards.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        spec = self.spec
        total = len(hu_images)
        masks: list[np.ndarray] = []
        bar = None
        if progress and total:
            from tqdm import tqdm

            bar = tqdm(total=total, desc="segment", unit="slice")
        was_training = self.model.training
        self.model.eval()
        try:
            with inference(self.compute):
                for start in range(0, total, batch_size):
                    chunk = hu_images[start : start + batch_size]
                    batch = torch.stack([to_model_input(hu, spec.image_size, spec.hu_window) for hu in chunk])
                    logits = self.forward(batch).float()
                    if logits.shape[1] != spec.classes:
                        raise ValueError(
                            f"model returned {logits.shape[1]} classes, spec says {spec.classes}"
                        )
                    masks += [
                        logits_to_native(lg, np.shape(hu)) for lg, hu in zip(logits, chunk, strict=True)
                    ]
                    if bar is not None:
                        bar.update(len(chunk))
        finally:
            self.model.train(was_training)
            if bar is not None:
                bar.close()
        log.debug("segmented %d slices at %d px on %s", total, spec.image_size, self.compute.label())
        return masks


def _torch_forward(model: torch.nn.Module, compute: Compute) -> Forward:
    def forward(batch: torch.Tensor) -> torch.Tensor:
        return model(compute.batch(batch))

    return forward


def predict_masks(
    model: torch.nn.Module,
    spec: ModelSpec,
    hu_images: Sequence[np.ndarray],
    *,
    batch_size: int = 4,
    progress: bool = False,
    compute: Compute | None = None,
) -> list[np.ndarray]:
    """One uint8 canonical mask per HU slice, at its native shape (:class:`Segmenter`, built for
    these slices and used once).

    ``compute`` (``common.device``): the model is moved to its device and memory format (in
    place, and left there) and the forward pass runs under its autocast (or on ONNX Runtime,
    see :class:`Segmenter`); the logits are upsampled and argmax-ed in float32. ``None``: fp32
    on the device the model is on.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    segment = Segmenter.build(model, spec, compute, slices=len(hu_images))
    return segment(hu_images, batch_size=batch_size, progress=progress)
