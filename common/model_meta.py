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

from protocols.findings import ErrorProfile
from protocols.protocol import LabelProtocol
from protocols.study import TrainSection

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


def model_context(meta: Mapping[str, object]) -> ModelContext:
    """Read the context back; a model written without it gets the empty context."""
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
        split=TrainSection.model_validate(split) if isinstance(split, dict) else TrainSection(),
        protocol=LabelProtocol.model_validate(protocol) if isinstance(protocol, dict) else LabelProtocol(),
        profile=ErrorProfile.model_validate(profile) if isinstance(profile, dict) else None,
    )


__all__ = ["ModelContext", "context_meta", "model_context"]
