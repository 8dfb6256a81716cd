"""What a model file says about its own validation: who trained it, how they split, its errors.

Stored in ``model.pt``'s metadata (``common.model.save_model(meta=...)``) by whoever trains
the model (the federated training study, ``sarcofed site train``), and read wherever the
model is validated later (``sarcofed site evaluate``), so that a site that trained the model
is scored as internal, on the same held-out test patients, and its findings can be compared
with the model's error profile on protocol-following labels.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from common.errors import SarcofedError
from protocols.findings import ErrorProfile
from protocols.protocol import LabelProtocol
from protocols.study import TrainSection, validation_problems

#: The metadata entry holding the context, as one JSON string (model meta holds scalars only).
CONTEXT_KEY = "validation_context"
log = logging.getLogger(__name__)

INTERNAL_SITES = "internal_sites"
SPLIT = "split"
PROTOCOL = "protocol"
ERROR_PROFILE = "error_profile"


@dataclass(frozen=True)
class ModelContext:
    """A model's validation context; empty (external everywhere, no profile) for a bare model."""

    internal_sites: tuple[str, ...] = ()
    split: TrainSection = field(default_factory=TrainSection)
    protocol: LabelProtocol = field(default_factory=LabelProtocol)
    profile: ErrorProfile | None = None


def context_meta(
    internal_sites: Collection[str],
    train: TrainSection,
    protocol: LabelProtocol,
    profile: ErrorProfile | None = None,
) -> dict[str, str | int | float]:
    """The metadata entry of a :class:`ModelContext` for ``save_model(meta=...)``."""
    context: dict[str, object] = {
        INTERNAL_SITES: sorted(internal_sites),
        SPLIT: train.model_dump(include={"val_fraction", "test_fraction", "seed"}),
        PROTOCOL: protocol.model_dump(mode="json"),
    }
    if profile is not None:
        context[ERROR_PROFILE] = profile.model_dump(mode="json")
    return {CONTEXT_KEY: json.dumps(context, sort_keys=True)}


_M = TypeVar("_M", bound=BaseModel)


def _read(model: type[_M], part: str, value: dict[str, object]) -> _M:
    """One part of the stored context, or a SarcofedError naming it and the way out."""
    try:
        return model.model_validate(value)
    except ValidationError as err:
        raise SarcofedError(
            f"this model's validation context cannot be read by this sarcofed version: its {part} "
            f"(metadata entry {CONTEXT_KEY}): {validation_problems(err)}. It says which sites trained the "
            "model, their split and the label protocol, so it is not skipped: evaluate the model with the "
            "sarcofed version that trained it, or retrain it with this one"
        ) from err


def model_context(meta: Mapping[str, object]) -> ModelContext:
    """Read the context back; a model written without it gets the empty context.

    Raises :class:`~common.errors.SarcofedError` when a part is there but this version cannot
    read it (a model written by another sarcofed version): guessing would score a site that
    trained the model as external, or apply another label protocol.
    """
    text = meta.get(CONTEXT_KEY)
    if not isinstance(text, str):
        return ModelContext()
    try:
        context = json.loads(text)
    except ValueError:
        log.warning("model metadata %s is not JSON; the model is treated as external everywhere", CONTEXT_KEY)
        return ModelContext()
    if not isinstance(context, dict):
        return ModelContext()
    sites = context.get(INTERNAL_SITES)
    split = context.get(SPLIT)
    protocol = context.get(PROTOCOL)
    profile = context.get(ERROR_PROFILE)
    return ModelContext(
        internal_sites=tuple(str(s) for s in sites) if isinstance(sites, list) else (),
        split=_read(TrainSection, SPLIT, split) if isinstance(split, dict) else TrainSection(),
        protocol=_read(LabelProtocol, PROTOCOL, protocol) if isinstance(protocol, dict) else LabelProtocol(),
        profile=_read(ErrorProfile, ERROR_PROFILE, profile) if isinstance(profile, dict) else None,
    )


__all__ = ["ModelContext", "context_meta", "model_context"]
