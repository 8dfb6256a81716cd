from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from common.errors import SarcofedError
from protocols.report import RoundRecord
from server.checkpoint import EarlyStopping, TrainingState, load_checkpoint, save_checkpoint


def test_early_stopping_counts_rounds_without_improvement() -> None:
    stop = EarlyStopping(patience=2)
    assert stop.update(1, 1.0) is True
    assert stop.update(2, 0.5) is True
    assert stop.update(3, 0.6) is False and not stop.should_stop
    assert stop.update(4, math.nan) is False and stop.should_stop  # a diverged round counts
    assert (stop.best_round, stop.best_loss) == (2, 0.5)


def test_a_round_without_a_pooled_loss_is_not_judged() -> None:
    """No site released a validation loss: nothing says the round was worse, so it does not
    count towards patience (it did, and a study whose sites all withheld stopped after
    ``patience`` rounds on a round-1 model)."""
    stop = EarlyStopping(patience=1)
    assert stop.update(1, None) is False and not stop.should_stop
    assert stop.update(2, 1.0) is True
    assert stop.update(3, None) is False and not stop.should_stop
    assert (stop.best_round, stop.rounds_without_improvement) == (2, 0)


def test_checkpoint_round_trip_restores_weights_round_and_patience(tmp_path: Path) -> None:
    state = TrainingState(
        completed_round=3,
        state_dict={"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "n": torch.tensor(7)},
        stopping=EarlyStopping(patience=5, best_loss=0.25, best_round=2, rounds_without_improvement=1),
        history=[RoundRecord(round=3, pooled_val_loss=0.3, sites_failed={"b": "timeout"})],
    )
    save_checkpoint(tmp_path, state)
    back = load_checkpoint(tmp_path)
    assert back.completed_round == 3
    assert torch.equal(back.state_dict["w"], state.state_dict["w"])
    assert back.state_dict["n"].item() == 7
    assert back.stopping == state.stopping
    assert back.history == state.history


#: One round as sarcofed 0.1 kept it in checkpoint.pt (a plain dict of RoundRecord's fields).
ROUND_V01 = {
    "round": 1,
    "start_weights_hash": "a" * 64,
    "sites_sent": ["hospital-a", "hospital-b"],
    "sites_replied": ["hospital-a"],
    "sites_failed": {"hospital-b": "timeout after 900 s"},
    "per_site": {"hospital-a": {"num-examples": 18.0, "n-val": 6.0, "val-loss-sum": 3.0}},
    "status": "ok",
    "pooled_val_loss": 0.5,
    "pooled_val_iou": {"muscle": 0.8, "msv": None},
    "weights_hash": "b" * 64,
    "improved": True,
    "seconds": 12.5,
}


def test_checkpoint_of_an_earlier_version_still_resumes(tmp_path: Path) -> None:
    torch.save(
        {
            "completed_round": 1,
            "state_dict": {"w": torch.ones(2)},
            "stopping": {"patience": 3, "best_loss": 0.5, "best_round": 1, "rounds_without_improvement": 0},
            "history_json": json.dumps([ROUND_V01]),
            "stopped_early": False,
        },
        tmp_path / "checkpoint.pt",
    )
    back = load_checkpoint(tmp_path)
    assert back.history == [RoundRecord.model_validate(ROUND_V01)]
    assert back.history[0].sites_failed == {"hospital-b": "timeout after 900 s"}
    save_checkpoint(tmp_path, back)  # and written back with every value kept (fields added since: empty)
    assert json.loads(torch.load(tmp_path / "checkpoint.pt")["history_json"]) == [ROUND_V01 | {"compute": {}}]


def test_a_checkpoint_with_a_broken_history_names_the_file(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, TrainingState(1, {}, EarlyStopping(patience=1)))
    data = torch.load(tmp_path / "checkpoint.pt")
    torch.save(data | {"history_json": json.dumps([{"round": "first"}])}, tmp_path / "checkpoint.pt")
    with pytest.raises(SarcofedError, match=r"checkpoint\.pt: its round history is not valid"):
        load_checkpoint(tmp_path)


def test_fresh_stopping_state_survives_infinite_best(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, TrainingState(0, {}, EarlyStopping(patience=1)))
    assert math.isinf(load_checkpoint(tmp_path).stopping.best_loss)


def test_resume_without_checkpoint_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(SarcofedError, match="no checkpoint"):
        load_checkpoint(tmp_path)
