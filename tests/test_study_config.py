from __future__ import annotations

import inspect
import tomllib
from pathlib import Path

import pytest

from protocols.model import ModelSpec
from protocols.study import DEMO_STUDY, DemoSection, Scalar, StudyConfig, demo_run_config, recipe_note

ROOT = Path(__file__).resolve().parents[1]


def _pyproject_run_config() -> dict[str, object]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def test_pyproject_run_config_is_valid_and_complete() -> None:
    flat = _pyproject_run_config()
    study = StudyConfig.from_run_config(flat)  # type: ignore[arg-type]
    assert set(flat) == set(StudyConfig.valid_keys()), "every study setting is visible in pyproject.toml"
    # The seed's loss, batch and patience; where the demo trains faster, its report says so.
    assert (study.train.batch_size, study.train.dice_weight, study.train.patience) == (4, 0.5, 10)
    note = recipe_note(study)
    assert note is not None and "train.optimizer adam (default rmsprop)" in note


def test_pyproject_run_config_is_the_study_defaults_with_the_demo_changes_key_for_key() -> None:
    """One owner per setting: the sections' defaults, then DEMO_STUDY; pyproject only writes them out.

    Values AND types: Flower passes pyproject's values as they are, and ``8`` vs ``8.0`` or
    ``"8"`` would change what a study does (or fail it).
    """
    pyproject = _pyproject_run_config()
    expected = demo_run_config()
    assert sorted(pyproject) == sorted(expected)
    assert {k: (type(v).__name__, v) for k, v in pyproject.items()} == {
        k: (type(v).__name__, v) for k, v in expected.items()
    }
    assert all(type(v) in (bool, int, float, str) for v in pyproject.values())


def test_demo_study_lists_only_real_changes_to_the_defaults() -> None:
    defaults = StudyConfig().to_flat()
    assert set(DEMO_STUDY) <= set(defaults)
    for key, value in DEMO_STUDY.items():
        assert value != defaults[key], f"{key} = {value!r} is already the default: drop it from DEMO_STUDY"
        assert type(value) is type(defaults[key]), key


def test_study_defaults_are_the_seed() -> None:
    study = StudyConfig()
    assert (study.model.arch, study.model.encoder, study.model.image_size) == ("unet", "resnet34", 512)
    assert (study.train.lr, study.train.optimizer, study.train.batch_size, study.train.patience) == (
        2e-4,
        "rmsprop",
        4,
        10,
    )


def test_the_recipe_note_names_each_change_to_the_seeds_model_and_training_with_both_values() -> None:
    assert recipe_note(StudyConfig()) is None
    assert recipe_note(StudyConfig.from_run_config({"study.name": "x", "demo.slices": 3})) is None
    note = recipe_note(StudyConfig.from_run_config({"train.optimizer": "adam", "model.image-size": 192}))
    assert note == (
        "model and training differ from the study defaults (the seed's recipe): "
        "model.image-size 192 (default 512), train.optimizer adam (default rmsprop)"
    )
    demo = recipe_note(StudyConfig.from_run_config(DEMO_STUDY))
    assert demo is not None
    for key, value in DEMO_STUDY.items():
        if key.split(".")[0] in ("model", "train") or key == "study.num-rounds":
            assert f"{key} {str(value).lower() if isinstance(value, bool) else value} (default " in demo, key
    # booleans as a coordinator types them in a run config, not as Python prints them
    assert "train.augment true (default false)" in demo


def test_demo_cli_makes_the_demo_studys_hospitals() -> None:
    from client.demo_cli import make

    params = inspect.signature(make).parameters
    demo = StudyConfig.from_run_config(demo_run_config()).demo
    assert params["slices"].default.default == demo.slices == DemoSection().slices
    assert params["size"].default.default == demo.size == DemoSection().size


def test_unknown_key_names_the_key_and_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"train\.lrr.*valid keys are:.*train\.lr"):
        StudyConfig.from_run_config({"train.lrr": 0.1})


def test_invalid_value_names_the_kebab_key() -> None:
    with pytest.raises(ValueError, match=r"train\.batch-size"):
        StudyConfig.from_run_config({"train.batch-size": 0})


def test_image_size_not_a_multiple_of_32_fails_at_parse_naming_key_and_rule() -> None:
    with pytest.raises(ValueError, match=r"model\.image-size: .*multiple of 32.*got 100; use 96 or 128"):
        StudyConfig.from_run_config({"model.image-size": 100})
    assert StudyConfig.from_run_config({"model.image-size": 96}).model.image_size == 96


def test_model_section_is_the_model_spec_with_four_run_config_keys() -> None:
    study = StudyConfig.from_run_config({"model.encoder": "resnet18", "model.image-size": 64})
    assert study.model == ModelSpec(encoder="resnet18", image_size=64)  # the spec a site receives
    assert study.to_flat("model") == {
        "model.arch": "unet",
        "model.encoder": "resnet18",
        "model.image-size": 64,
        "model.norm": "batch",
    }
    assert StudyConfig.from_run_config({"model.norm": "group"}).model.norm == "group"
    with pytest.raises(ValueError, match=r"model\.norm: .*unknown model norm 'layer'.*batch, group"):
        StudyConfig.from_run_config({"model.norm": "layer"})
    # the rest of the spec is the pipeline's, not a study setting
    with pytest.raises(ValueError, match=r"unknown run-config key\(s\) \['model.classes'\]"):
        StudyConfig.from_run_config({"model.classes": 3})


def test_comma_lists_and_flat_round_trip() -> None:
    study = StudyConfig.from_run_config(
        {"study.exclude-from-training": "hospital-b, hospital-c", "train.lr": 0.01}
    )
    assert study.study.exclude_from_training == ("hospital-b", "hospital-c")
    again = StudyConfig.from_run_config(study.to_flat())
    assert again == study


def test_the_label_protocol_is_declared_by_run_config_keys() -> None:
    study = StudyConfig.from_run_config(
        {
            "protocol.name": "no-psoas",
            "protocol.muscles": "paraspinal,abdominal_wall",
            "protocol.muscle-hu": "-30,150",
        }
    )
    assert study.protocol.muscles == ("paraspinal", "abdominal_wall")
    assert study.protocol.hu_ranges.muscle == (-30.0, 150.0)
    assert StudyConfig.from_run_config(study.to_flat()) == study  # survives the trip through a ConfigRecord
    with pytest.raises(ValueError, match=r"protocol\.muscle-hu"):
        StudyConfig.from_run_config({"protocol.muscle-hu": "150,-29"})
    with pytest.raises(ValueError, match=r"protocol\.muscles"):
        StudyConfig.from_run_config({"protocol.muscles": "psoas,liver"})


def test_validation_and_test_fractions_must_leave_patients_to_train_on() -> None:
    with pytest.raises(ValueError, match="leave patients to train on"):
        StudyConfig.from_run_config({"train.val-fraction": 0.5, "train.test-fraction": 0.5})
    with pytest.raises(ValueError) as caught:
        StudyConfig.from_run_config({"train.val-fraction": 0.5, "train.test-fraction": 0.5})
    assert str(caught.value) == (
        "invalid run config: train.val-fraction + train.test-fraction must leave patients to train on, "
        "got 0.5 + 0.5"
    )


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"model.image-size": 100}, "model.image-size: the image size must be a multiple of 32"),
        ({"protocol.muscle-hu": "150,-29"}, "protocol.muscle-hu: an HU range is (low, high) with low < high"),
        ({"protocol.muscle-hu": "low,150"}, "protocol.muscle-hu: expected 'low,high' in HU (e.g. '-29,150')"),
    ],
)
def test_run_config_errors_read_as_our_words_not_pydantics(config: dict[str, Scalar], expected: str) -> None:
    with pytest.raises(ValueError) as caught:
        StudyConfig.from_run_config({"protocol.name": "site-x"} | config)
    message = str(caught.value)
    assert expected in message, message
    assert "Value error" not in message and "could not convert" not in message


@pytest.mark.parametrize(
    ("config", "differs"),
    [
        ({"protocol.muscles": "psoas,paraspinal"}, "muscles"),
        ({"protocol.imat-in-muscle": True}, "imat-in-muscle"),
        (
            {"protocol.muscle-hu": "-30,150", "protocol.visceral-fat-hu": "-190,-30"},
            "muscle-hu, visceral-fat-hu",
        ),
    ],
)
def test_a_protocol_that_differs_from_alberta_may_not_be_called_alberta(
    config: dict[str, Scalar], differs: str
) -> None:
    """Else the report would say "alberta: ... intramuscular fat counted as muscle"."""
    with pytest.raises(ValueError) as caught:
        StudyConfig.from_run_config(config)
    assert str(caught.value) == (
        f"invalid run config: protocol.name: this protocol differs from Alberta in {differs}; "
        'give it its own name, e.g. protocol.name="site-x-2024"'
    )
    named = StudyConfig.from_run_config(config | {"protocol.name": "site-x-2024"})
    assert named.protocol.describe().startswith("site-x-2024: ")
    # the Alberta muscles in another order are still Alberta
    assert (
        StudyConfig.from_run_config(
            {"protocol.muscles": "abdominal_wall,quadratus_lumborum,paraspinal,psoas"}
        ).protocol.name
        == "alberta"
    )
