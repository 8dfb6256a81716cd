"""Message record keys and metric names, defined once for client and server."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from protocols.classes import METRIC_CLASSES

# RecordDict keys ---------------------------------------------------------------
ARRAYS: Final = "arrays"  #: ArrayRecord: the packed model weights (one float32 array)
PACKED: Final = "packed"  #: key of the single Array inside ARRAYS
CONFIG: Final = "config"  #: ConfigRecord: the round's instructions
METRICS: Final = "metrics"  #: MetricRecord: training aggregates
PAYLOAD: Final = "payload"  #: ConfigRecord holding PAYLOAD_JSON
PAYLOAD_JSON: Final = "json"  #: str: an EvaluationPayload / SiteInfo serialised as JSON
#: ConfigRecord of a training reply: what the site ran the model on (protocols.compute.ComputeUsed)
COMPUTE: Final = "compute"
COMPUTE_DEVICE: Final = "device"  #: key in COMPUTE: "cpu" | "cuda" | "mps"
COMPUTE_PRECISION: Final = "precision"  #: key in COMPUTE: "fp32" | "bf16" | "fp16"

# Instruction (ConfigRecord) keys sent by the server ----------------------------------
TASK: Final = "task"  #: "identify" | "train" | "evaluate" | "compare"
SERVER_ROUND: Final = "server-round"
MODEL_SPEC: Final = "model-spec"  #: JSON of protocols.model.ModelSpec
MODEL_LAYOUT: Final = "model-layout"  #: JSON layout to unpack the packed weights
MODEL_HASH: Final = "model-hash"
ROLE: Final = "role"  #: evaluate: "internal" (the site trained this model) | "external"
PROXIMAL_MU: Final = "proximal-mu"  #: injected by Flower's FedProx

TASKS: Final[tuple[str, ...]] = ("identify", "train", "evaluate", "compare")

#: The only instruction keys a site accepts; any other key is refused by the site guard.
#: Study settings travel as "<section>.<name>" run-config keys (see protocols.study).
INSTRUCTION_KEYS: Final[frozenset[str]] = frozenset(
    {TASK, SERVER_ROUND, MODEL_SPEC, MODEL_LAYOUT, MODEL_HASH, PROXIMAL_MU, ROLE}
)

# MetricRecord keys of a training reply (aggregates only) ---------------------------
NUM_EXAMPLES: Final = "num-examples"  #: number of training SLICES (FedAvg weight), not batches
N_VAL: Final = "n-val"  #: number of validation slices
TRAIN_LOSS: Final = "train-loss"  #: mean training loss of the last epoch
TRAIN_LOSS_SUM: Final = "train-loss-sum"  #: its sum over the training slices
VAL_LOSS: Final = "val-loss"  #: mean validation loss (only when N_VAL > 0)
VAL_LOSS_SUM: Final = "val-loss-sum"  #: its sum over the validation slices (pools across sites)
EPOCHS: Final = "epochs"
SECONDS: Final = "seconds"  #: the site's local training time
N_VAL_PATIENTS: Final = "n-val-patients"  #: patients of the validation split that gave a slice
#: 1.0 when the site's policy withheld the validation metrics (too few validation patients or
#: slices: min-val-patients / min-val-slices in its policy.toml); the val-* keys are then absent.
VAL_WITHHELD: Final = "val-withheld"
DP_EPSILON: Final = "dp-epsilon"  #: DP-SGD: epsilon this round's local training spent (Opacus RDP)
DP_DELTA: Final = "dp-delta"  #: DP-SGD: the delta that epsilon is for


#: convention-aware training (``train.convention-aware``): 1.0 in the reply of a site that trained so
CONVENTION_AWARE: Final = "convention-aware"
#: 1.0 when the site withheld the share of an adjustment applied on fewer slices than its
#: policy's min-slices (that adjustment's keys are then absent)
CONVENTION_WITHHELD: Final = "convention-withheld"
#: The adjustments convention-aware training may make to a site's targets (common.label_conventions):
#: relabelled by the protocol's HU ranges, IMAT holes filled, a tight-contour band, a muscle group.
CONVENTION_ADJUSTMENTS: Final[tuple[str, ...]] = ("hu_range", "imat_holes", "boundary", "psoas", "paraspinal")
#: What a convention-aware training reply accounts for, adjustment by adjustment: the adjustments,
#: plus ``contour``, the relabelling part of ``boundary`` (the muscle a tight contour left out,
#: regrown to the tissue edge), whose pixels still teach; ``boundary``'s own share is then the
#: pixels it ignores.
CONVENTION_TALLIES: Final[tuple[str, ...]] = (
    "hu_range",
    "imat_holes",
    "boundary",
    "contour",
    "psoas",
    "paraspinal",
)
#: The adjustments that ignore pixels (the others relabel them): their shares are labelled pixels
#: that teach nothing, so a convention-aware site's FedAvg weight shrinks by them
#: (``server.training.training_weight``).
CONVENTION_IGNORES: Final[tuple[str, ...]] = ("boundary", "psoas", "paraspinal")


def convention_keys(adjustment: str) -> tuple[str, str]:
    """(share, slices) keys of one adjustment: the pixels it relabelled or ignored as a share of
    the site's labelled training pixels (pooled over slices), and on how many training slices it
    applied; e.g. ``("convention-psoas-share", "convention-psoas-slices")``."""
    return f"convention-{adjustment}-share", f"convention-{adjustment}-slices"


def convention_taught_share(metrics: Mapping[str, float]) -> float:
    """The share of a convention-aware site's labelled training pixels that still teach: 1 minus
    the shares of its ignore-type adjustments (:data:`CONVENTION_IGNORES`) in its training reply's
    ``metrics``, at least 0; 1.0 when it reports none (or withheld them)."""
    ignored = sum(float(metrics.get(convention_keys(name)[0], 0.0)) for name in CONVENTION_IGNORES)
    return max(0.0, 1.0 - ignored)


def convention_declared_key(adjustment: str) -> str:
    """1.0 in a convention-aware training reply when the site declares this convention in its
    site.toml (``label_conventions``), whether or not its audit confirmed it; e.g.
    ``"convention-psoas-declared"``. The adjustment's share keys say whether it was applied."""
    return f"convention-{adjustment}-declared"


def val_overlap_keys(cls: str) -> tuple[str, str]:
    """(intersection, union) keys of a metric class's validation pixel counts, e.g.
    ``("val-muscle-intersection", "val-muscle-union")``; ``cls`` is one of METRIC_CLASSES."""
    return f"val-{cls}-intersection", f"val-{cls}-union"


TRAIN_METRIC_KEYS: Final[tuple[str, ...]] = (
    NUM_EXAMPLES,
    N_VAL,
    TRAIN_LOSS,
    TRAIN_LOSS_SUM,
    VAL_LOSS,
    VAL_LOSS_SUM,
    EPOCHS,
    SECONDS,
    *(key for cls in METRIC_CLASSES for key in val_overlap_keys(cls)),
    N_VAL_PATIENTS,
    VAL_WITHHELD,
    DP_EPSILON,
    DP_DELTA,
    CONVENTION_AWARE,
    CONVENTION_WITHHELD,
    *(key for adjustment in CONVENTION_TALLIES for key in convention_keys(adjustment)),
    *(convention_declared_key(adjustment) for adjustment in CONVENTION_ADJUSTMENTS),
)

#: The keys of a training reply that describe the validation split's slices: what a site
#: withholds when its validation split is below its policy's minimums.
VAL_METRIC_KEYS: Final[tuple[str, ...]] = (
    VAL_LOSS,
    VAL_LOSS_SUM,
    *(key for cls in METRIC_CLASSES for key in val_overlap_keys(cls)),
)

# Error codes of site replies ---------------------------------------------------------
ERROR_REFUSED: Final = 4001  #: the site's policy, allow-list or guard refused the instruction
ERROR_FAILED: Final = 4002  #: the site tried and failed (reason says why)
