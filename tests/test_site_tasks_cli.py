"""`sarcofed site compare | evaluate | train` on a real demo site, through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from common.demo.hospitals import make_site, site_profile
from protocols.payloads import EvaluationPayload
from server.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def psoas_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo profile whose muscle labels leave out psoas (profile 1), 8 slices at 128 px.

    (At 96 px, ~4 mm pixels, the psoas finding is only scattered: region naming needs resolution.)
    """
    return make_site(tmp_path_factory.mktemp("sites") / "b", site_profile(1), slices=8, size=128, seed=3)


def test_compare_prints_the_payload_with_the_psoas_finding(psoas_site: Path) -> None:
    result = runner.invoke(app, ["site", "compare", str(psoas_site), "--json"])
    assert result.exit_code == 0, result.output
    payload = EvaluationPayload.model_validate_json(result.stdout)
    assert payload.task == "compare" and payload.n_used == 8
    systematic = [(f.tissue, f.direction, f.region) for f in payload.findings if f.systematic]
    assert systematic == [("muscle", "site_excludes", "psoas")]
    # The reference includes psoas, the site does not: the reference's muscle area is larger.
    assert payload.areas["muscle"].mean_diff_cm2 is not None and payload.areas["muscle"].mean_diff_cm2 > 0


def test_preview_applies_the_site_policy_and_marks_what_it_suppressed(
    psoas_site: Path, tmp_path: Path
) -> None:
    site = tmp_path / "site"
    import shutil

    shutil.copytree(psoas_site, site)
    (site / "policy.toml").write_text("min-cell-count = 3\nallow-polar-maps = false\n")
    result = runner.invoke(app, ["site", "compare", str(site), "--json"])
    assert result.exit_code == 0, result.output
    payload = EvaluationPayload.model_validate_json(result.stdout)
    assert payload.suppressed, "small cells must be marked, never silently zeroed"
    for name, scores in payload.scores.items():
        assert all(v == 0 or v >= 3 for v in scores.bins.values()), name
    assert payload.discrepancy is None or payload.discrepancy.polar is None


def test_train_then_evaluate_with_the_trained_model(psoas_site: Path, tmp_path: Path) -> None:
    model = tmp_path / "model.pt"
    result = runner.invoke(
        app,
        [
            "site",
            "train",
            str(psoas_site),
            "--out",
            str(model),
            "--epochs",
            "1",
            "--encoder",
            "resnet18",
            "--image-size",
            "64",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    held_out = summary["n_test_held_out"]
    assert summary["n_train"] + summary["n_val"] + held_out == 8 and held_out >= 1 and model.exists()
    # the model names this site: it is scored as internal, on its held-out test patients only
    result = runner.invoke(app, ["site", "evaluate", str(psoas_site), "--model", str(model), "--json"])
    assert result.exit_code == 0, result.output
    payload = EvaluationPayload.model_validate_json(result.stdout)
    assert payload.task == "evaluate" and payload.model_hash == summary["weights_hash"]
    assert (payload.role, payload.split, payload.n_in_split) == ("internal", "test", held_out)
    assert sum(payload.scores["muscle"].bins.values()) + payload.scores["muscle"].undefined == held_out
    # asked to score it as an external site would, every slice counts
    result = runner.invoke(
        app, ["site", "evaluate", str(psoas_site), "--model", str(model), "--json", "--role", "external"]
    )
    payload = EvaluationPayload.model_validate_json(result.stdout)
    assert (payload.role, payload.split) == ("external", "all")
    assert sum(payload.scores["muscle"].bins.values()) + payload.scores["muscle"].undefined == 8
    assert payload.raw_scores is not None and payload.label_audit is not None


def test_missing_model_is_a_clear_error_not_a_traceback(psoas_site: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["site", "evaluate", str(psoas_site), "--model", str(tmp_path / "nope.pt")])
    assert result.exit_code == 1
    assert "nope.pt" in result.output and "Traceback" not in result.output
