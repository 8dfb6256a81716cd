"""Model or labels, with a real (imperfect) model on hospitals it never saw.

A U-Net is trained on the train patients of two reference-convention demo hospitals, scored on
their held-out test patients (internal) and on unseen hospitals (external): one per planted
label convention and two that follow the reference convention. Each finding is attributed by
the coordinator's own function. The same suite, larger, is ``bench/bench_attribution.py``
(its precision and recall are in bench/README.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bench_attribution import EXPECTED, SuiteResult, run_suite

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> SuiteResult:
    import torch

    torch.set_num_threads(2)
    return run_suite(
        tmp_path_factory.mktemp("suite"), slices=24, size=192, image_size=128, epochs=30, seeds=1
    )


def test_the_model_is_imperfect_and_has_its_own_systematic_errors(suite: SuiteResult) -> None:
    internal = [s for s in suite.sites if s.role == "internal"]
    # scored on their held-out test patients only (a quarter of 24 slices, by patient hash)
    assert len(internal) == 2 and all(0 < s.n_used <= 12 for s in internal), internal
    # Imperfect in the sense that matters here: systematic errors of its own on its internal test
    # patients. Not a cap on its IoU >= 0.9 share: at 4-5 test slices per site that share moves
    # with the machine's float arithmetic (CI's machine: < 0.95; this session's 2-core one: 1.0).
    assert suite.internal_muscle_ge_09 is not None
    assert suite.model_errors, "a model this small makes systematic errors of its own"


def test_every_planted_convention_is_named_and_attributed_to_the_site(suite: SuiteResult) -> None:
    planted = {s.convention: s for s in suite.sites if s.convention in EXPECTED}
    assert set(planted) == set(EXPECTED)
    for convention, site in planted.items():
        primary = EXPECTED[convention][0]
        # the model comparison shows it as the site's, or shows nothing there (a model error that
        # cancels it); either way the site's label audit names it, and nothing calls it the model's
        assert site.systematic.get(primary, "site_convention") == "site_convention", (
            convention,
            site.systematic,
        )
        assert primary in site.audit or any(k in site.audit for k in EXPECTED[convention]), site.audit
    assert suite.recall == 1.0 and suite.precision == 1.0, (suite.false_positive, suite.missed)


def test_reference_convention_hospitals_get_no_site_convention_finding(suite: SuiteResult) -> None:
    references = [s for s in suite.sites if s.convention.startswith("reference")]
    assert len(references) == 4  # two trained on (internal), two never seen (external)
    for site in references:
        assert "site_convention" not in site.systematic.values(), (site.site, site.systematic)
        assert site.audit == [], site.audit


def test_the_models_own_systematic_errors_are_attributed_to_the_model(suite: SuiteResult) -> None:
    """Kinds in the model's profile (its errors on the internal test patients) show up at external
    hospitals, and wherever one does, outside what that hospital's convention implies, it is the
    model's."""
    external = [s for s in suite.sites if s.role == "external"]
    seen = {key: [s for s in external if key in s.systematic] for key in suite.model_errors}
    # not vacuous: some error of the profile shows up outside (which ones depends on the model's
    # float arithmetic; e.g. muscle boundary errors may stay below "systematic" at every hospital)
    assert any(seen.values()), f"no error of the model's profile {suite.model_errors} is systematic outside"
    for key, at in seen.items():
        for site in at:
            if key not in EXPECTED.get(site.convention, ()):
                assert site.systematic[key] == "model", (site.site, key, site.systematic[key])
