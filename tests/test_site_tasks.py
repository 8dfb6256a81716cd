"""``client.site_tasks``: what a site does for each instruction, called without Flower."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from fixtures_site import make_site

from client import site_tasks
from common.dataset import load_site, row_group
from protocols.study import StudyConfig


def test_run_evaluate_puts_the_hash_it_is_given_in_the_payload_without_hashing_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ClientApp hashes the weights it received once; scoring does not hash them a second time."""
    import common.site_evaluation
    from common.model import ModelSpec, build_model

    spec = ModelSpec(encoder="resnet18", image_size=32)
    model = build_model(spec)
    site = load_site(make_site(tmp_path, n=2, size=32))

    def no_second_hash(*_: object) -> str:
        raise AssertionError("the received weights were hashed again")

    monkeypatch.setattr(common.site_evaluation, "weights_hash", no_second_hash)
    scored = site_tasks.run_evaluate(site, model, spec, StudyConfig(), model_hash="c0ffee" * 4)
    assert scored.payload.model_hash == "c0ffee" * 4


def test_train_and_val_samples_are_the_splits_train_and_validation_patients_only(tmp_path: Path) -> None:
    from common.splits import split_site
    from protocols.study import TrainSection

    site = load_site(make_site(tmp_path, n=10, size=32))
    section = TrainSection(val_fraction=0.2, test_fraction=0.2, seed=3)
    train, val = site_tasks.train_and_val_samples(site, section)
    split = split_site(site, section)
    groups = [row_group(site, i) for i in range(len(site.rows))]
    assert sorted(s.group for s in train) == sorted(groups[i] for i in split.train)
    assert sorted(s.group for s in val) == sorted(groups[i] for i in split.val)
    assert not {s.group for s in train + val} & {groups[i] for i in split.test}
    loaded = site_tasks.split_samples(site, section)
    assert [s.group for s in loaded.train] == [s.group for s in train] and loaded.split == split
    assert [s.group for s in loaded.val] == [s.group for s in val] and loaded.excluded == {}


def test_convention_aware_training_reports_its_adjustments_as_shares_and_plain_training_none(
    tmp_path: Path,
) -> None:
    """A psoas-excluding demo hospital: its own audit asks to ignore the psoas region; the reply
    says so as a share of its labelled pixels over its training slices, nothing per slice."""
    import torch

    from common.demo.hospitals import SITE_PROFILES
    from common.demo.hospitals import make_site as make_demo_site
    from common.model import ModelSpec, build_model
    from protocols import keys

    torch.set_num_threads(1)
    profile = next(p for p in SITE_PROFILES if p.key == "psoas left out")
    site = load_site(make_demo_site(tmp_path / "b", profile, slices=10, size=128, seed=2))
    spec = ModelSpec(encoder="resnet18", image_size=32)
    base = {"train.val-fraction": 0.0, "train.test-fraction": 0.1, "model.image-size": 32}
    aware = StudyConfig.from_run_config(base | {"train.convention-aware": True})
    _, metrics = site_tasks.run_train(site, build_model(spec), spec, aware)
    share_key, slices_key = keys.convention_keys("psoas")
    assert metrics[keys.CONVENTION_AWARE] == 1.0
    assert 0.05 < metrics[share_key] < 0.4  # the psoas is a fraction of the labelled tissue
    assert metrics[slices_key] == metrics[keys.NUM_EXAMPLES]
    assert not {k for k in metrics if k.startswith("convention-")} - set(keys.TRAIN_METRIC_KEYS)
    _, plain = site_tasks.run_train(site, build_model(spec), spec, StudyConfig.from_run_config(base))
    assert not [k for k in plain if k.startswith("convention")]
    # site.toml declares the psoas convention (confirmed: applied, and said) and a boundary one
    # its audit contradicts (said, not applied)
    declared = replace(
        site, config=site.config.model_copy(update={"label_conventions": ("psoas", "boundary")})
    )
    _, told = site_tasks.run_train(declared, build_model(spec), spec, aware)
    assert told[keys.convention_declared_key("psoas")] == 1.0 and told[share_key] == metrics[share_key]
    assert told[keys.convention_declared_key("boundary")] == 1.0
    assert keys.convention_keys("boundary")[0] not in told
