"""The study model's forward pass on ONNX Runtime: the fastest fp32 path found for a CPU.

Measured on a 2-core AVX-512 CPU, resnet34 U-Net at 512 px, batch 4, per slice (bench/README.md,
issue 16): PyTorch fp32 contiguous 520-540 ms, channels_last 400 ms, ONNX Runtime 295-300 ms
(it folds batch norm into the convolutions and picks its own kernels). That is about 200
GFLOP/s on 62 GFLOP per slice, above what a large fp32 matmul sustains on that CPU. The network
is exported once per process (``torch.onnx.export``, 1-2 s at 512 px for a resnet34), so a site
uses it only when it has enough slices to segment (:data:`MIN_SLICES`, applied by
``common.device.Compute.for_slices``).

The export is of the same float32 weights and the outputs are float32: the masks agree with
PyTorch's on all but a handful of pixels per site and the seed's IoU bins are the same on the
demo hospitals (tests/test_device_agreement.py). A network the exporter cannot take is run by
PyTorch instead (:func:`try_onnx_forward` returns None and says why in the log).
"""

from __future__ import annotations

import copy
import importlib.util
import io
import logging
import time
import warnings
from typing import Final

import numpy as np
import torch

log = logging.getLogger(__name__)

#: Below this many slices a site segments with PyTorch: the export (1-2 s for a resnet34 U-Net at
#: 512 px) costs more than ONNX Runtime saves (~0.1 s per slice there).
MIN_SLICES: Final = 32
#: The ONNX operator set the export targets (ONNX Runtime 1.17+ runs it).
OPSET: Final = 17


def onnxruntime_available() -> bool:
    """ONNX Runtime and the ``onnx`` package (which the exporter needs) are installed."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx"))


def export_onnx(model: torch.nn.Module, image_size: int, in_channels: int) -> bytes:
    """``model`` as an ONNX graph (batch size free), exported from an fp32 CPU copy in eval mode.

    The copy leaves ``model`` itself where it is (device, memory format, train mode).
    """
    twin = copy.deepcopy(model).to(device="cpu", dtype=torch.float32)
    twin.to(memory_format=torch.contiguous_format)
    twin.eval()
    example = torch.zeros(1, in_channels, image_size, image_size)
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow in timm/smp
        torch.onnx.export(
            twin,
            (example,),
            buffer,  # type: ignore[arg-type]  # a file object is accepted (torch.onnx.export's docs)
            dynamo=False,
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=OPSET,
            # ONNX Runtime folds batch norm into the convolutions itself when the session is made:
            # the same outputs, bit for bit, and the export takes 40% less time (1.75 s vs 2.9 s for
            # a resnet34 U-Net at 512 px here).
            do_constant_folding=False,
        )
    return buffer.getvalue()


class OnnxForward:
    """A forward pass on an ONNX Runtime CPU session: float32 batch (N x C x S x S) -> logits."""

    def __init__(self, graph: bytes, *, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: ORT warns about unused initializers
        self._session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        images = np.ascontiguousarray(batch.detach().to("cpu", torch.float32).numpy())
        (logits,) = self._session.run(None, {self._input: images})
        return torch.from_numpy(logits)


def try_onnx_forward(model: torch.nn.Module, image_size: int, in_channels: int) -> OnnxForward | None:
    """The model on ONNX Runtime, or None (logged with the reason) when it cannot be exported or
    loaded there: the caller runs PyTorch instead."""
    if not onnxruntime_available():
        log.info("ONNX Runtime is not installed; segmenting with PyTorch")
        return None
    started = time.perf_counter()
    try:
        forward = OnnxForward(export_onnx(model, image_size, in_channels), threads=torch.get_num_threads())
    except Exception as exc:  # any exporter or runtime failure: PyTorch segments as before
        log.warning("the model could not be run on ONNX Runtime (%s); segmenting with PyTorch", exc)
        return None
    log.info("model exported to ONNX Runtime in %.1f s", time.perf_counter() - started)
    return forward


__all__ = ["MIN_SLICES", "OnnxForward", "export_onnx", "onnxruntime_available", "try_onnx_forward"]
