from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from protocols.study import StudyConfig

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_run_config_is_valid_and_complete() -> None:
    flat = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    study = StudyConfig.from_run_config(flat)
    assert set(flat) == set(StudyConfig.valid_keys()), "every study setting is visible in pyproject.toml"
    # The seed's recipe is the default.
    assert (study.train.lr, study.train.batch_size, study.train.optimizer) == (2e-4, 4, "rmsprop")
    assert (study.train.dice_weight, study.train.patience) == (0.5, 10)


def test_unknown_key_names_the_key_and_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"train\.lrr.*valid keys are:.*train\.lr"):
        StudyConfig.from_run_config({"train.lrr": 0.1})


def test_invalid_value_names_the_kebab_key() -> None:
    with pytest.raises(ValueError, match=r"train\.batch-size"):
        StudyConfig.from_run_config({"train.batch-size": 0})


def test_comma_lists_and_flat_round_trip() -> None:
    study = StudyConfig.from_run_config(
        {"study.exclude-from-training": "hospital-b, hospital-c", "train.lr": 0.01}
    )
    assert study.study.exclude_from_training == ("hospital-b", "hospital-c")
    again = StudyConfig.from_run_config(study.to_flat())
    assert again == study
