"""Where the model runs and in what precision: :func:`resolve_compute` turns a request into a
:class:`Compute`, which inference (``common.inference``) and training (``common.training``) use.

A request is a device (``auto`` | ``cpu`` | ``cuda`` | ``mps``) and a precision (``auto`` |
``fp32`` | ``bf16`` | ``fp16``), from the study (``compute.device``), the site's node config or
a site command's ``--device``. ``auto`` means: CUDA when PyTorch sees a GPU, then Apple's MPS,
else the CPU. For training, ``auto`` precision is bf16 autocast on a CUDA GPU that has it (else
fp16), bf16 on a CPU with bf16 instructions (AVX512-BF16 or AMX, as PyTorch itself detects
them), else fp32. For inference (validation replies, ``site evaluate``), ``auto`` precision is
fp32: on the demo hospitals a briefly trained U-Net's bf16 masks agreed with the fp32 masks on
only 99.86-99.96% of pixels and moved slices between the seed's IoU bins at two of three
hospitals, where issue 16 asks for >= 99.9% and identical bins; fp32 in channels_last gives the
fp32 masks (tests/test_device_agreement.py). bf16 inference runs only when asked for by name.
fp32 inference on a CPU runs on ONNX Runtime where it is installed and a site has at least
``common.onnx_forward.MIN_SLICES`` slices to segment (an export of the same network, ~1.35x
faster than channels_last here; :meth:`Compute.for_slices` decides), else on PyTorch.
channels_last memory format on CPU and CUDA (faster convolutions there; MPS gains nothing
from it).

The choice is a pure function (:func:`choose_compute`) of a small :class:`Capabilities` record;
:func:`probe_capabilities` is the thin part that asks torch. Weights always stay float32
(autocast casts inside the forward pass only), so packed float32 weights load exactly and a
trained state_dict leaves as float32. A request the machine cannot serve raises
:class:`ComputeUnavailable` naming the setting and what to set instead.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Final, Literal

import torch

from common.errors import SarcofedError
from common.onnx_forward import MIN_SLICES, onnxruntime_available
from protocols.compute import (
    AUTO,
    DEVICES,
    PRECISIONS,
    ComputeUsed,
    Device,
    DeviceRequest,
    Precision,
    PrecisionRequest,
    Runtime,
)

log = logging.getLogger(__name__)

_DTYPES: Final[dict[str, torch.dtype]] = {"bf16": torch.bfloat16, "fp16": torch.float16}


class ComputeUnavailable(SarcofedError):
    """A device or precision was asked for that this machine cannot run."""


@dataclass(frozen=True)
class Capabilities:
    """What this machine's PyTorch can run (tests pass their own)."""

    cuda: bool = False  #: a CUDA GPU PyTorch can use
    cuda_bf16: bool = False  #: that GPU computes in bf16 (Ampere and later)
    mps: bool = False  #: Apple's Metal backend
    cpu_bf16: bool = False  #: the CPU has bf16 instructions (AVX512-BF16 or AMX)
    onnxruntime: bool = False  #: ONNX Runtime (and the exporter's ``onnx``) is installed


def probe_capabilities() -> Capabilities:
    """Ask torch what this machine has (the only impure part of device choice)."""
    cuda = bool(torch.cuda.is_available())
    mps_backend = getattr(torch.backends, "mps", None)
    cpu = torch.cpu
    cpu_bf16 = any(
        bool(getattr(cpu, check, lambda: False)())
        for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    )
    return Capabilities(
        onnxruntime=onnxruntime_available(),
        cuda=cuda,
        cuda_bf16=cuda and bool(torch.cuda.is_bf16_supported()),
        mps=bool(mps_backend is not None and mps_backend.is_available()),
        cpu_bf16=cpu_bf16,
    )


@dataclass(frozen=True)
class Compute:
    """A device, the forward pass's precision (autocast; weights stay fp32), memory format and runtime.

    ``runtime`` ``onnxruntime`` (CPU, fp32 only) runs the forward pass on an ONNX export of the
    model (``common.onnx_forward``) when at least ``runtime_min_slices`` slices are segmented
    (:meth:`for_slices`); PyTorch otherwise, or where the export fails.
    """

    device: Device = "cpu"
    precision: Precision = "fp32"
    channels_last: bool = False
    runtime: Runtime = "torch"
    runtime_min_slices: int = 0

    def __post_init__(self) -> None:
        if self.runtime == "onnxruntime" and (self.device, self.precision) != ("cpu", "fp32"):
            raise ComputeUnavailable(
                "ONNX Runtime runs sarcofed's models on the CPU in fp32 only, "
                f"not {self.device} {self.precision}"
            )

    def for_slices(self, count: int) -> Compute:
        """The compute for segmenting ``count`` slices: PyTorch when they are too few to pay for
        the ONNX export (``runtime_min_slices``)."""
        if self.runtime != "torch" and count < self.runtime_min_slices:
            return self.with_torch()
        return self

    def with_torch(self) -> Compute:
        """The same device, precision and memory format, run by PyTorch."""
        return replace(self, runtime="torch", runtime_min_slices=0)

    @classmethod
    def of_model(cls, model: torch.nn.Module) -> Compute:
        """fp32, contiguous, on the device ``model`` is on: running it as it is."""
        first = next(model.parameters(), None)
        device = first.device.type if first is not None else "cpu"
        if device not in DEVICES:
            raise ComputeUnavailable(
                f"the model is on device {device!r}; sarcofed runs on {', '.join(DEVICES)}"
            )
        return cls(device=device)  # type: ignore[arg-type]

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def used(self) -> ComputeUsed:
        """What a site's reply says it ran on."""
        return ComputeUsed(device=self.device, precision=self.precision, runtime=self.runtime)

    def label(self) -> str:
        """``"cpu bf16 channels_last"``, ``"cpu fp32 onnxruntime"``: for logs and benches."""
        label = f"{self.device} {self.precision}"
        if self.runtime != "torch":
            return f"{label} {self.runtime}"
        return label + (" channels_last" if self.channels_last else "")

    def autocast(self) -> contextlib.AbstractContextManager[object]:
        """The forward pass's precision: ``torch.autocast`` for bf16 / fp16, nothing for fp32."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device, dtype=_DTYPES[self.precision])

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` moved (in place) to the device and memory format; its weights stay float32."""
        model.to(device=self.torch_device)
        model.to(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        return model

    def batch(self, images: torch.Tensor) -> torch.Tensor:
        """A model-input batch (N x C x H x W) on the device, in the memory format."""
        out = images.to(self.torch_device, non_blocking=self.device == "cuda")
        return out.contiguous(memory_format=torch.channels_last) if self.channels_last else out


#: Today's path and the reference every faster path is checked against: fp32, contiguous, CPU.
REFERENCE: Final = Compute()


def _unavailable(what: str, setting: str, why: str, fix: str) -> ComputeUnavailable:
    return ComputeUnavailable(f"{setting} = {what!r} was asked for, but {why}; {fix}")


def _device(request: str, caps: Capabilities, setting: str) -> Device:
    if request == AUTO:
        return "cuda" if caps.cuda else "mps" if caps.mps else "cpu"
    if request == "cuda" and not caps.cuda:
        raise _unavailable(
            "cuda",
            setting,
            "PyTorch sees no CUDA GPU on this machine (no GPU, no driver, or a CPU-only torch build)",
            f"set {setting} to 'auto' or 'cpu', or install a CUDA build of torch",
        )
    if request == "mps" and not caps.mps:
        raise _unavailable(
            "mps", setting, "Apple's MPS backend is not available here", f"set {setting} to 'auto' or 'cpu'"
        )
    if request not in DEVICES:
        raise ComputeUnavailable(
            f"{setting} = {request!r} is not a device; valid choices are: {', '.join((AUTO, *DEVICES))}"
        )
    return request  # type: ignore[return-value]


def _precision(request: str, device: Device, caps: Capabilities, setting: str) -> Precision:
    if request not in (AUTO, *PRECISIONS):
        raise ComputeUnavailable(
            f"{setting} = {request!r} is not a precision; valid choices are: {', '.join((AUTO, *PRECISIONS))}"
        )
    bf16 = {"cuda": caps.cuda_bf16, "cpu": caps.cpu_bf16, "mps": False}[device]
    if request == AUTO:
        if device == "cuda":
            return "bf16" if bf16 else "fp16"
        return "bf16" if bf16 else "fp32"
    if request == "bf16" and not bf16:
        where = {"cuda": "this GPU", "cpu": "this CPU (no AVX512-BF16 or AMX)", "mps": "MPS"}[device]
        raise _unavailable(
            "bf16", setting, f"{where} has no bf16 arithmetic", f"set {setting} to 'auto' or 'fp32'"
        )
    if request == "fp16" and device != "cuda":
        raise _unavailable(
            "fp16",
            setting,
            f"fp16 autocast is for CUDA GPUs, and this model runs on {device}",
            f"set {setting} to 'auto' or 'fp32'",
        )
    return request  # type: ignore[return-value]


#: What the model is run for: ``auto`` precision differs (see the module docstring).
Purpose = Literal["training", "inference"]


def choose_compute(
    device: DeviceRequest | str,
    precision: PrecisionRequest | str,
    caps: Capabilities,
    *,
    purpose: Purpose = "training",
    device_setting: str = "compute.device",
    precision_setting: str = "compute.precision",
) -> Compute:
    """The :class:`Compute` for a request on a machine with ``caps`` (pure).

    ``purpose`` ``inference``: ``auto`` precision is fp32 (the masks a validation reports are
    the fp32 network's); a precision asked for by name is used for both purposes. fp32
    inference on the CPU runs on ONNX Runtime where ``caps`` has it, for jobs of at least
    ``common.onnx_forward.MIN_SLICES`` slices (:meth:`Compute.for_slices`).

    ``device_setting`` / ``precision_setting`` name where the request came from
    (``--device``, the node config's ``device``) in the error a request the machine cannot
    serve raises (:class:`ComputeUnavailable`).
    """
    chosen = _device(str(device), caps, device_setting)
    if purpose == "inference" and precision == AUTO:
        precision = "fp32"
    compute = Compute(
        device=chosen,
        precision=_precision(str(precision), chosen, caps, precision_setting),
        channels_last=chosen in ("cpu", "cuda"),
    )
    if purpose == "inference" and caps.onnxruntime and (compute.device, compute.precision) == ("cpu", "fp32"):
        return replace(compute, runtime="onnxruntime", runtime_min_slices=MIN_SLICES)
    return compute


def resolve_compute(
    device: DeviceRequest | str = AUTO,
    precision: PrecisionRequest | str = AUTO,
    *,
    purpose: Purpose = "training",
    capabilities: Capabilities | None = None,
    device_setting: str = "compute.device",
    precision_setting: str = "compute.precision",
) -> Compute:
    """:func:`choose_compute` on this machine (``capabilities``: probed when not given)."""
    caps = capabilities if capabilities is not None else probe_capabilities()
    compute = choose_compute(
        device,
        precision,
        caps,
        purpose=purpose,
        device_setting=device_setting,
        precision_setting=precision_setting,
    )
    log.debug("compute %s (asked for device %s, precision %s; %s)", compute.label(), device, precision, caps)
    return compute


@contextlib.contextmanager
def inference(compute: Compute) -> Iterator[None]:
    """``torch.inference_mode`` and the precision's autocast, together."""
    with torch.inference_mode(), compute.autocast():
        yield


__all__ = [
    "REFERENCE",
    "Capabilities",
    "Compute",
    "ComputeUnavailable",
    "Purpose",
    "choose_compute",
    "inference",
    "probe_capabilities",
    "resolve_compute",
]
