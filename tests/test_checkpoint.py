from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from common.errors import SarcofedError
from server.checkpoint import EarlyStopping, TrainingState, load_checkpoint, save_checkpoint


def test_early_stopping_counts_rounds_without_improvement() -> None:
    stop = EarlyStopping(patience=2)
    assert stop.update(1, 1.0) is True
    assert stop.update(2, 0.5) is True
    assert stop.update(3, 0.6) is False and not stop.should_stop
    assert stop.update(4, None) is False and stop.should_stop  # a round without validation counts too
    assert (stop.best_round, stop.best_loss) == (2, 0.5)


def test_checkpoint_round_trip_restores_weights_round_and_patience(tmp_path: Path) -> None:
    state = TrainingState(
        completed_round=3,
        state_dict={"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "n": torch.tensor(7)},
        stopping=EarlyStopping(patience=5, best_loss=0.25, best_round=2, rounds_without_improvement=1),
        history=[{"round": 3, "pooled_val_loss": 0.3}],
    )
    save_checkpoint(tmp_path, state)
    back = load_checkpoint(tmp_path)
    assert back.completed_round == 3
    assert torch.equal(back.state_dict["w"], state.state_dict["w"])
    assert back.state_dict["n"].item() == 7
    assert back.stopping == state.stopping
    assert back.history == state.history


def test_fresh_stopping_state_survives_infinite_best(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, TrainingState(0, {}, EarlyStopping(patience=1)))
    assert math.isinf(load_checkpoint(tmp_path).stopping.best_loss)


def test_resume_without_checkpoint_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(SarcofedError, match="no checkpoint"):
        load_checkpoint(tmp_path)
