"""Internal validation never scores a slice the model trained on or was selected on.

The site's own training (``run_train``) and its internal evaluation (``run_evaluate`` with role
``internal``) are run on one demo site while every slice the site loads is recorded: the
evaluation must load exactly the test part of the split, and no patient of it may have been
loaded for training or validation.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import common.dataset
from client.site_tasks import run_evaluate, run_train
from common.dataset import load_site, row_group
from common.demo.hospitals import make_site, site_profile
from common.model import build_model
from common.splits import split_site
from protocols.study import StudyConfig

STUDY = StudyConfig.from_run_config(
    {
        "model.encoder": "resnet18",
        "model.image-size": 64,
        "train.local-epochs": 1,
        "train.val-fraction": 0.25,
        "train.test-fraction": 0.25,
        "study.discrepancy": False,
    }
)


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_site(
        tmp_path_factory.mktemp("internal") / "site", site_profile(0), slices=16, size=64, seed=3
    )


@pytest.fixture
def loaded_rows(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every valid manifest row the site loads, in order (a spy on the one loader)."""
    seen: list[int] = []
    real = common.dataset.load_slice

    def spy(site, index, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(index)
        return real(site, index, **kwargs)

    monkeypatch.setattr(common.dataset, "load_slice", spy)
    return seen


def test_internal_evaluation_scores_only_test_patients_never_trained_or_selected_on(
    site_dir: Path, loaded_rows: list[int]
) -> None:
    site = load_site(site_dir)
    split = split_site(site, STUDY.train)
    assert split.test and split.val and split.train
    model = build_model(STUDY.model)
    run_train(site, model, STUDY.model, STUDY)
    trained = set(loaded_rows)
    loaded_rows.clear()
    payload = run_evaluate(site, model, STUDY.model, STUDY, role="internal").payload
    scored = set(loaded_rows)
    assert scored == set(split.test)
    assert trained == set(split.train) | set(split.val)
    assert scored.isdisjoint(trained)
    patients = {row_group(site, i) for i in scored}
    assert patients.isdisjoint(row_group(site, i) for i in trained)
    assert (payload.role, payload.split, payload.n_in_split) == ("internal", "test", len(split.test))
    assert payload.n_used == len(split.test)


def test_external_evaluation_scores_every_slice(site_dir: Path, loaded_rows: list[int]) -> None:
    site = load_site(site_dir)
    payload = run_evaluate(site, build_model(STUDY.model), STUDY.model, STUDY, role="external").payload
    assert sorted(loaded_rows) == list(range(len(site.rows)))
    assert (payload.role, payload.split, payload.n_used) == ("external", "all", len(site.rows))


def test_a_site_declaring_the_model_it_trained_is_internal(site_dir: Path) -> None:
    from client.site_tasks import site_role

    site = load_site(site_dir)
    declared = site.config.model_copy(update={"contributed_models": ("ab" * 6,)})
    site = common.dataset.SiteDataset(root=site.root, config=declared, rows=site.rows, lines=site.lines)
    assert site_role(site, "external", "abababababab" + "0" * 52) == "internal"
    assert site_role(site, "external", "cd" * 32) == "external"
    assert site_role(site, "internal", "cd" * 32) == "internal"
