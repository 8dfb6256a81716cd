"""The study model: construction, fingerprint, transport packing and model.pt files.

A model is fully described by a :class:`~protocols.model.ModelSpec` (architecture, encoder,
channels, classes, input size and the HU window used to normalise CT; re-exported here) plus a
state_dict. This module adds what needs the model zoo: the arch / encoder name checks
(:func:`check_model_names`) and :func:`build_model`. Encoders are always built with
``encoder_weights=None``: hospitals are offline and nothing may download at run time.
A spec with ``norm = "group"`` gets every BatchNorm replaced by GroupNorm
(:func:`to_group_norm`), the same network at every site and at the coordinator.

Transport: Flower's cost grows with the number of arrays rather than bytes, so
:func:`pack_state` flattens a whole state_dict into ONE float32 vector plus a JSON layout
string. Float32 (not raw bytes) is deliberate: the server averages the packed vectors
(FedAvg, FedProx, DP clipping and noise all work element-wise), which is only meaningful
when each element is a weight value. Integer buffers (BatchNorm ``num_batches_tracked``)
are not weights and travel inside the layout instead: a step counter in the array would
be averaged, and would dominate the update norm that DP clipping bounds.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import math
import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import segmentation_models_pytorch as smp
import torch

from common.errors import SarcofedError
from protocols.model import DEFAULT_HU_WINDOW, ModelSpec

log = logging.getLogger(__name__)

ARCHITECTURES: Final[tuple[str, ...]] = tuple(smp.MODEL_ARCHITECTURES_MAPPING)

MODEL_FORMAT: Final = "sarcofed-model"
MODEL_FORMAT_VERSION: Final = 1
PACK_FORMAT: Final = "sarcofed-packed-v1"

__all__ = [
    "ARCHITECTURES",
    "DEFAULT_HU_WINDOW",
    "MODEL_FILE_NAME",
    "LoadedModel",
    "ModelSpec",
    "build_model",
    "check_arch",
    "check_encoder",
    "check_model_names",
    "load_model",
    "model_from_state",
    "pack_state",
    "resolve_model_path",
    "save_model",
    "to_group_norm",
    "unpack_state",
    "weights_hash",
]

# dtypes whose every value float32 represents exactly (they go into the packed array).
_FLOAT_DTYPES: Final = (torch.float32, torch.float16, torch.bfloat16)
# dtypes that travel as exact integer values in the layout.
_INT_DTYPES: Final = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)


def _is_timm_model(name: str) -> bool:
    import timm

    return bool(timm.is_model(name))


def check_arch(name: str) -> str:
    """``name`` (lower case) when smp has that architecture; a ValueError listing the choices."""
    key = name.lower()
    if key not in ARCHITECTURES:
        raise ValueError(f"unknown model arch {name!r}; valid choices are: {', '.join(ARCHITECTURES)}")
    return key


def check_encoder(name: str) -> str:
    """``name`` when it is an smp encoder or ``tu-<timm model>``; a ValueError with close matches."""
    names = smp.encoders.get_encoder_names()
    if name.startswith("tu-") and _is_timm_model(name[3:]):
        return name
    if name not in names:
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
        hint = f"close matches: {', '.join(close)}" if close else f"e.g. {', '.join(names[:6])}"
        raise ValueError(
            f"unknown encoder {name!r} ({hint}); see segmentation_models_pytorch.encoders."
            "get_encoder_names() for all choices, or 'tu-<timm model name>'"
        )
    return name


def check_model_names(spec: ModelSpec) -> ModelSpec:
    """``spec`` when its arch and encoder name a network the model zoo has; a ValueError otherwise.

    The schema (``protocols.model``) cannot check names: it never imports the model zoo.
    """
    check_arch(spec.arch)
    check_encoder(spec.encoder)
    return spec


#: GroupNorm's usual group count (Wu & He 2018); fewer where a layer's channels do not divide.
GROUPS: Final = 32


def to_group_norm(model: torch.nn.Module, *, name: str = "model") -> torch.nn.Module:
    """``model`` with every ``BatchNorm2d`` replaced, in place, by ``GroupNorm(gcd(32, C), C)``.

    As Opacus's ``ModuleValidator.fix`` does (its choice for DP-SGD), but without Opacus and
    with a group count that always divides the channels. Only plain ``torch.nn.BatchNorm2d``
    is replaced: a subclass that also holds an activation (timm's ``BatchNormAct2d``) would
    lose it, so such a network raises ValueError naming the layer instead. Returns ``model``.
    """
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is torch.nn.BatchNorm2d:
                channels = child.num_features
                group_norm = torch.nn.GroupNorm(math.gcd(GROUPS, channels), channels, eps=child.eps)
                setattr(parent, child_name, group_norm)
    left = [
        f"{n} ({type(m).__name__})"
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    ]
    if left:
        more = f" and {len(left) - 3} more" if len(left) > 3 else ""
        raise ValueError(
            f"model.norm = 'group' cannot convert {name}: its layers {', '.join(left[:3])}{more} are "
            "batch normalisation that sarcofed does not replace; choose an encoder built from torch "
            "BatchNorm2d (resnet18, resnet34, resnet50, mobilenet_v2, ...) or model.norm = 'batch'"
        )
    return model


def build_model(spec: ModelSpec) -> torch.nn.Module:
    """A freshly initialised network for ``spec`` (never downloads weights).

    ``spec.norm == "group"`` replaces the BatchNorm layers by GroupNorm (:func:`to_group_norm`).
    Raises ValueError for an unknown arch or encoder (with the valid choices), a pair smp
    cannot build, or a network whose normalisation cannot be converted.
    """
    check_model_names(spec)
    try:
        model = smp.create_model(
            spec.arch,
            encoder_name=spec.encoder,
            encoder_weights=None,
            in_channels=spec.in_channels,
            classes=spec.classes,
        )
    except Exception as err:  # smp raises assorted errors for incompatible arch/encoder pairs
        raise ValueError(
            f"cannot build arch {spec.arch!r} with encoder {spec.encoder!r}: {type(err).__name__}: {err}"
        ) from err
    if spec.norm == "group":
        to_group_norm(model, name=f"arch {spec.arch!r} with encoder {spec.encoder!r}")
    return model


def model_from_state(spec: ModelSpec, state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """The network for ``spec`` holding (copies of) ``state``, without initialising it first.

    Sites rebuild the study model from the server's weights every round; building it on
    PyTorch's ``meta`` device and assigning the received tensors skips the random
    initialisation that :func:`build_model` spends most of its time on (~4x faster for a
    resnet18 U-Net). Raises ``RuntimeError`` (from ``load_state_dict``) when the state does not
    fit the spec. Falls back to a normal build if a module keeps state outside ``state_dict``.
    """
    with torch.device("meta"):
        model = build_model(spec)
    model.load_state_dict({k: v.detach().clone() for k, v in state.items()}, assign=True)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):  # non-persistent buffers
        model = build_model(spec)
        model.load_state_dict(state)
    return model


def _as_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    return flat.view(torch.uint8).numpy().tobytes()


def weights_hash(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 (hex) over names, dtypes, shapes and bytes of every tensor, in sorted name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name]
        header = f"{name}\0{str(tensor.dtype).removeprefix('torch.')}\0{tuple(tensor.shape)}\0"
        digest.update(header.encode())
        digest.update(_as_bytes(tensor))
    return digest.hexdigest()


def _state_of(model_or_state: torch.nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = model_or_state.state_dict() if isinstance(model_or_state, torch.nn.Module) else model_or_state
    return {name: t.detach().cpu() for name, t in state.items()}


# ------------------------------------------------------------------------- packing


def pack_state(state: Mapping[str, torch.Tensor]) -> tuple[np.ndarray, str]:
    """Float tensors as ONE 1-D float32 array; the JSON layout to rebuild the state_dict.

    Float32/float16/bfloat16 tensors go into the array (exactly). Integer and bool tensors
    (BatchNorm ``num_batches_tracked``) are not weights: their values travel inside the
    layout, so the array holds only values a strategy may average, clip or noise. Other
    dtypes (float64, complex) raise ValueError.
    """
    entries: list[list[Any]] = []
    parts: list[np.ndarray] = []
    for name, tensor in state.items():
        t = tensor.detach().cpu()
        entry: list[Any] = [name, str(t.dtype).removeprefix("torch."), list(t.shape)]
        if t.dtype in _FLOAT_DTYPES:
            parts.append(t.to(torch.float32).reshape(-1).numpy())
        elif t.dtype in _INT_DTYPES:
            entry.append(t.to(torch.int64).reshape(-1).tolist())
        else:
            raise ValueError(
                f"cannot pack {name!r} of dtype {t.dtype}: supported dtypes are float32/float16/bfloat16 "
                "and integer/bool tensors; cast the state_dict to float32 first"
            )
        entries.append(entry)
    packed = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
    layout = {"format": PACK_FORMAT, "size": int(packed.size), "entries": entries}
    return np.ascontiguousarray(packed, dtype=np.float32), json.dumps(layout, separators=(",", ":"))


def unpack_state(array: np.ndarray, layout: str) -> dict[str, torch.Tensor]:
    """Inverse of :func:`pack_state`: float tensors from ``array``, integer ones from ``layout``.

    Unpacking an aggregated array with the coordinator's layout gives the layout's integer
    buffers (BatchNorm step counters, unused by smp models whose BatchNorm momentum is set).
    """
    try:
        info = json.loads(layout)
        if info.get("format") != PACK_FORMAT:
            raise ValueError(f"format is {info.get('format')!r}, expected {PACK_FORMAT!r}")
        entries = [
            (str(e[0]), str(e[1]), [int(s) for s in e[2]], e[3] if len(e) > 3 else None)
            for e in info["entries"]
        ]
        size = int(info["size"])
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as err:
        raise ValueError(f"invalid packed-weights layout: {err}") from err
    flat = np.asarray(array)
    if flat.ndim != 1 or flat.size != size:
        raise ValueError(f"packed weights have shape {flat.shape}; the layout expects a 1-D array of {size}")
    if not np.issubdtype(flat.dtype, np.floating):
        raise ValueError(f"packed weights must be a float array, got dtype {flat.dtype}")
    source = torch.from_numpy(np.ascontiguousarray(flat, dtype=np.float32))
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for name, dtype_name, shape, values in entries:
        dtype = getattr(torch, dtype_name, None)
        if not isinstance(dtype, torch.dtype) or dtype not in (*_FLOAT_DTYPES, *_INT_DTYPES):
            raise ValueError(
                f"invalid packed-weights layout: entry {name!r} has unsupported dtype {dtype_name!r}"
            )
        count = int(np.prod(shape, dtype=np.int64))
        if dtype in _FLOAT_DTYPES:
            out[name] = source[offset : offset + count].reshape(shape).to(dtype).clone()
            offset += count
        elif not isinstance(values, list) or len(values) != count:
            raise ValueError(f"invalid packed-weights layout: entry {name!r} needs {count} integer values")
        else:
            out[name] = torch.tensor(values, dtype=torch.int64).reshape(shape).to(dtype)
    if offset != size:
        raise ValueError(f"invalid packed-weights layout: entries cover {offset} values of {size}")
    return out


# ------------------------------------------------------------------------- model.pt files


@dataclass(frozen=True)
class LoadedModel:
    model: torch.nn.Module  #: in eval mode
    spec: ModelSpec
    meta: dict[str, str | int | float]
    weights_hash: str


def save_model(
    path: Path | str,
    model_or_state: torch.nn.Module | Mapping[str, torch.Tensor],
    spec: ModelSpec,
    meta: Mapping[str, str | int | float] | None = None,
) -> Path:
    """Write a ``model.pt`` file (spec, state_dict, meta, weights hash); returns its path.

    Written to a temporary file first and renamed, so a crash never leaves half a model.
    """
    path = Path(path)
    meta_dict = dict(meta or {})
    for key, value in meta_dict.items():
        if not isinstance(key, str) or isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ValueError(f"model meta must map str to str/int/float; {key!r} has {type(value).__name__}")
    state = _state_of(model_or_state)
    payload = {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "spec": spec.model_dump(mode="json"),
        "state_dict": state,
        "meta": meta_dict,
        "weights_hash": weights_hash(state),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    log.info("saved model %s (weights %s)", path, str(payload["weights_hash"])[:16])
    return path


#: The file name of the study model in a run folder (what ``--model RUN_DIR`` means).
MODEL_FILE_NAME: Final = "model.pt"
#: How a user gets a model, for every "this is not one" error.
_HOW_TO_GET = (
    f"give the {MODEL_FILE_NAME} a sarcofed study writes into its run folder (or the run folder "
    "itself), or one written by `sarcofed site train --out`"
)


def resolve_model_path(path: Path | str) -> Path:
    """The model file that a ``--model`` / ``study.model`` argument names.

    A file is itself; a folder (a study's run folder) means its ``model.pt``. Raises
    :class:`~common.errors.SarcofedError` naming the path when there is no such file.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        inside = path / MODEL_FILE_NAME
        if inside.is_file():
            return inside
        raise SarcofedError(f"{path}: a folder without a {MODEL_FILE_NAME} in it; {_HOW_TO_GET}")
    if not path.exists():
        raise SarcofedError(f"{path}: model file not found; {_HOW_TO_GET}")
    if not path.is_file():
        raise SarcofedError(f"{path}: not a regular file, so not a sarcofed model; {_HOW_TO_GET}")
    return path


def _is_training_checkpoint(payload: object) -> bool:
    """True for the resume checkpoint a training study writes (``server.checkpoint``)."""
    return isinstance(payload, dict) and {"completed_round", "state_dict", "stopping"} <= payload.keys()


def _read_model_payload(path: Path) -> object:
    """``torch.load`` of ``path`` with ``weights_only=True``; a file that is not a sarcofed model
    (text, a truncated or foreign file) raises SarcofedError that says so, never PyTorch's advice to
    load it unsafely."""
    if not zipfile.is_zipfile(path):  # torch.save has written zip archives since PyTorch 1.6
        raise SarcofedError(
            f"{path}: not a sarcofed model (its content is not a PyTorch archive); {_HOW_TO_GET}"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a PyTorch file holding more than tensors and plain values, or damaged
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        detail = "" if not first or "weights_only" in str(err) else f": {first}"
        raise SarcofedError(
            f"{path}: not a sarcofed model (a PyTorch file sarcofed cannot read safely"
            f"{detail}); {_HOW_TO_GET}"
        ) from None


def load_model(path: Path | str) -> LoadedModel:
    """Read a file written by :func:`save_model` (or a run folder's, :func:`resolve_model_path`);
    the model comes back in eval mode. The one owner of reading a ``--model`` argument.

    Raises :class:`~common.errors.SarcofedError` naming the file when it is missing, is not a
    sarcofed model (a training checkpoint is named as such, with the model.pt beside it), or its
    weights do not match the stored hash.
    """
    path = resolve_model_path(path)
    payload = _read_model_payload(path)
    if _is_training_checkpoint(payload):
        beside = path.parent / MODEL_FILE_NAME
        where = (
            f"use {beside} beside it"
            if beside.is_file()
            else f"there is no {MODEL_FILE_NAME} beside it yet (a study writes one after its first round)"
        )
        raise SarcofedError(
            f"{path}: a training checkpoint (written so that a stopped study can resume), not a "
            f"model; {where}"
        )
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise SarcofedError(
            f"{path}: not a sarcofed model (a PyTorch file without format={MODEL_FORMAT!r}); {_HOW_TO_GET}"
        )
    if payload.get("format_version") != MODEL_FORMAT_VERSION:
        raise SarcofedError(
            f"{path}: model format version {payload.get('format_version')!r} is not supported "
            f"(this sarcofed reads version {MODEL_FORMAT_VERSION})"
        )
    try:
        spec = check_model_names(ModelSpec.model_validate(payload["spec"]))
    except Exception as err:
        raise SarcofedError(f"{path}: invalid model spec: {err}") from err
    state = payload["state_dict"]
    actual = weights_hash(state)
    if actual != payload.get("weights_hash"):
        raise SarcofedError(
            f"{path}: weights hash mismatch (stored {str(payload.get('weights_hash'))[:16]}, "
            f"computed {actual[:16]}): the file is corrupted or was edited"
        )
    try:
        model = model_from_state(spec, state)
    except RuntimeError as err:
        raise SarcofedError(f"{path}: weights do not fit the spec {spec.model_dump()}: {err}") from err
    model.eval()
    return LoadedModel(model=model, spec=spec, meta=dict(payload.get("meta") or {}), weights_hash=actual)
