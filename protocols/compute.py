"""Where a site runs the model, and in what precision: the names every layer shares.

The study asks (``compute.device`` / ``compute.precision`` in ``protocols.study``, usually
``auto``), a site may override it (its node config, or ``--device`` / ``--precision`` on the
site commands), and ``common.device.resolve_compute`` picks what the machine can do. The
site's reply says what it used (:class:`ComputeUsed`): a validation payload's ``compute``
field, a training reply's ``compute`` ConfigRecord (``protocols.keys``).
"""

from __future__ import annotations

from typing import Final, Literal

from protocols.base import Schema

#: A device a site can run the model on.
Device = Literal["cpu", "cuda", "mps"]
#: The arithmetic of the forward pass: fp32, or autocast to bf16 / fp16 (weights stay fp32).
Precision = Literal["fp32", "bf16", "fp16"]
#: A request: a device or precision, or ``auto`` (the best the machine has).
DeviceRequest = Literal["auto", "cpu", "cuda", "mps"]
PrecisionRequest = Literal["auto", "fp32", "bf16", "fp16"]
#: What runs the forward pass: PyTorch itself, or ONNX Runtime on a CPU (an export of the same
#: network, fp32; ``common.onnx_forward``).
Runtime = Literal["torch", "onnxruntime"]

DEVICES: Final[tuple[str, ...]] = ("cpu", "cuda", "mps")
PRECISIONS: Final[tuple[str, ...]] = ("fp32", "bf16", "fp16")
AUTO: Final = "auto"


class ComputeUsed(Schema):
    """What a site ran the model on: the device, the forward pass's precision and its runtime."""

    device: Device
    precision: Precision
    runtime: Runtime = "torch"

    def label(self) -> str:
        """``"cpu bf16"``, ``"cpu fp32 (ONNX Runtime)"``: how the report names it."""
        return f"{self.device} {self.precision}" + (
            " (ONNX Runtime)" if self.runtime == "onnxruntime" else ""
        )


__all__ = [
    "AUTO",
    "DEVICES",
    "PRECISIONS",
    "ComputeUsed",
    "Device",
    "DeviceRequest",
    "Precision",
    "PrecisionRequest",
    "Runtime",
]
