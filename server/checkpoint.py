"""Server-side early stopping and checkpoint/resume of a training study (no Flower)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from pydantic import ValidationError

from common.errors import SarcofedError
from protocols.report import RoundRecord


@dataclass
class EarlyStopping:
    """Stop when the pooled validation loss has not improved for ``patience`` rounds.

    A round without a pooled loss (no site released one) is not judged: it neither counts
    towards ``patience`` nor becomes the best round. A non-finite loss (training diverged)
    counts as no improvement.
    """

    patience: int
    best_loss: float = math.inf
    best_round: int = 0
    rounds_without_improvement: int = 0

    def update(self, server_round: int, loss: float | None) -> bool:
        """Record a round's pooled loss; returns True when it is a new best."""
        if loss is None:
            return False
        if not math.isfinite(loss):
            self.rounds_without_improvement += 1
            return False
        if loss < self.best_loss:
            self.best_loss, self.best_round = loss, server_round
            self.rounds_without_improvement = 0
            return True
        self.rounds_without_improvement += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.rounds_without_improvement >= self.patience


@dataclass
class TrainingState:
    """Everything needed to continue a stopped study where it left off."""

    completed_round: int
    state_dict: dict[str, torch.Tensor]
    stopping: EarlyStopping
    history: list[RoundRecord] = field(default_factory=list)
    stopped_early: bool = False


CHECKPOINT_NAME = "checkpoint.pt"


def save_checkpoint(run_dir: Path, state: TrainingState) -> Path:
    """Write atomically (tmp + rename) so a server killed mid-write leaves the last good one."""
    path = run_dir / CHECKPOINT_NAME
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "completed_round": state.completed_round,
            "state_dict": state.state_dict,
            "stopping": asdict(state.stopping),
            "history_json": json.dumps([r.model_dump(mode="json") for r in state.history]),
            "stopped_early": state.stopped_early,
        },
        tmp,
    )
    tmp.replace(path)
    return path


def load_checkpoint(run_dir: Path) -> TrainingState:
    path = run_dir / CHECKPOINT_NAME
    if not path.exists():
        raise SarcofedError(
            f"{path}: no checkpoint to resume from; run the study once with this run-name first"
        )
    data = torch.load(path, weights_only=True)
    stopping = dict(data["stopping"])
    if stopping.get("best_loss") is None:
        stopping["best_loss"] = math.inf
    try:  # the round records of every sarcofed version so far (plain dicts of RoundRecord's fields)
        history = [RoundRecord.model_validate(r) for r in json.loads(data["history_json"])]
    except ValidationError as err:
        raise SarcofedError(
            f"{path}: its round history is not valid ({err}); start the study under a new study.run-name"
        ) from err
    return TrainingState(
        completed_round=int(data["completed_round"]),
        state_dict=data["state_dict"],
        stopping=EarlyStopping(**stopping),
        history=history,
        stopped_early=bool(data.get("stopped_early", False)),
    )
