"""Message record keys and metric names, defined once for client and server."""

from __future__ import annotations

from typing import Final

# RecordDict keys ---------------------------------------------------------------
ARRAYS: Final = "arrays"  #: ArrayRecord: the packed model weights (one float32 array)
PACKED: Final = "packed"  #: key of the single Array inside ARRAYS
CONFIG: Final = "config"  #: ConfigRecord: the round's instructions
METRICS: Final = "metrics"  #: MetricRecord: training aggregates
PAYLOAD: Final = "payload"  #: ConfigRecord holding PAYLOAD_JSON
PAYLOAD_JSON: Final = "json"  #: str: an EvaluationPayload / SiteInfo serialised as JSON

# Instruction (ConfigRecord) keys sent by the server ----------------------------------
TASK: Final = "task"  #: "identify" | "train" | "evaluate" | "compare"
SERVER_ROUND: Final = "server-round"
MODEL_SPEC: Final = "model-spec"  #: JSON of common.model.ModelSpec
MODEL_LAYOUT: Final = "model-layout"  #: JSON layout to unpack the packed weights
MODEL_HASH: Final = "model-hash"
PROXIMAL_MU: Final = "proximal-mu"  #: injected by Flower's FedProx

TASKS: Final[tuple[str, ...]] = ("identify", "train", "evaluate", "compare")

#: The only instruction keys a site accepts; any other key is refused by the site guard.
#: Study settings travel as "<section>.<name>" run-config keys (see protocols.study).
INSTRUCTION_KEYS: Final[frozenset[str]] = frozenset(
    {TASK, SERVER_ROUND, MODEL_SPEC, MODEL_LAYOUT, MODEL_HASH, PROXIMAL_MU}
)

# MetricRecord keys of a training reply (aggregates only) ---------------------------
NUM_EXAMPLES: Final = "num-examples"  #: number of training SLICES (FedAvg weight), not batches
TRAIN_METRIC_KEYS: Final[tuple[str, ...]] = (
    NUM_EXAMPLES,
    "n-val",
    "train-loss",
    "train-loss-sum",
    "val-loss",
    "val-loss-sum",
    "epochs",
    "seconds",
    "val-muscle-intersection",
    "val-muscle-union",
    "val-subcutaneous_fat-intersection",
    "val-subcutaneous_fat-union",
    "val-visceral_fat-intersection",
    "val-visceral_fat-union",
    "val-msv-intersection",
    "val-msv-union",
)

# Error codes of site replies ---------------------------------------------------------
ERROR_REFUSED: Final = 4001  #: the site's policy, allow-list or guard refused the instruction
ERROR_FAILED: Final = 4002  #: the site tried and failed (reason says why)
