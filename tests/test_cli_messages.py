"""What the ``sarcofed`` CLI says to a person who makes a common mistake, run as a user would
(``CliRunner`` at 80 columns): no traceback, the fix in words, and text printed verbatim."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from common.cutoffs import get_cutoff_set
from common.demo.hospitals import make_site, site_profile
from protocols.study import StudyConfig
from server.cli import app

WIDTH = 80


def _run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Exit code and output (stdout and stderr) of ``sarcofed ARGS`` at 80 columns."""
    env = {"COLUMNS": str(WIDTH), **(env or {})}
    result = CliRunner().invoke(app, list(args), env=env, terminal_width=WIDTH)
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


def _words(output: str) -> str:
    """``output`` as one line of words, rich's box borders left out."""
    return " ".join(w for w in output.split() if w not in "│╭╮╰╯─")


@pytest.fixture(scope="module")
def demo_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Demo hospital A (mask values 1, 7, 5, and 2 = IMAT declared as background), 6 small slices."""
    return make_site(tmp_path_factory.mktemp("cli") / "site", site_profile(0), slices=6, size=64, seed=3)


# ------------------------------------------------------------------ --cutoff-set / study.cutoff-set
def test_cutoff_set_is_accepted_in_any_case(demo_site: Path) -> None:
    code, out = _run("site", "compare", str(demo_site), "--cutoff-set", "Korean", "--json")
    assert code == 0, out
    assert json.loads(out)["sarcopenia"]["cutoff_set"] == "korean"
    assert get_cutoff_set(" KOREAN ").name == "korean"


def test_an_unknown_cutoff_set_lists_the_choices_on_one_line(demo_site: Path) -> None:
    code, out = _run("site", "compare", str(demo_site), "--cutoff-set", "Korea")
    assert code == 2
    assert "'Korea' is not one of 'prado2008', 'martin2013', 'korean'." in _words(out)
    assert len(out.splitlines()) < 10  # a usage error, not a 40-line traceback


def test_study_config_takes_the_cutoff_set_in_any_case() -> None:
    assert StudyConfig.from_run_config({"study.cutoff-set": "Martin2013"}).study.cutoff_set == "martin2013"
    flat = StudyConfig.from_run_config({"study.cutoff-set": "KOREAN"}).to_flat("study")
    assert flat["study.cutoff-set"] == "korean" and type(flat["study.cutoff-set"]) is str  # Flower's type
    with pytest.raises(ValueError, match=r"study\.cutoff-set: .*'prado2008', 'martin2013' or 'korean'"):
        StudyConfig.from_run_config({"study.cutoff-set": "korea"})


def test_study_run_refuses_an_unknown_cutoff_set_before_starting_flower(tmp_path: Path) -> None:
    app_dir = Path(__file__).parents[1]  # the sarcofed app (pyproject.toml)
    flower = {"FLWR_HOME": str(tmp_path)}  # should it reach Flower, it finds no connection
    code, out = _run("study", "run", str(app_dir), "--config", "study.cutoff-set=Korea", env=flower)
    assert code == 1
    assert "study.cutoff-set: Input should be 'prado2008', 'martin2013' or 'korean'" in " ".join(out.split())


def test_compare_tables_fit_80_columns(demo_site: Path) -> None:
    result = CliRunner().invoke(app, ["site", "compare", str(demo_site)], env={"COLUMNS": str(WIDTH)})
    assert result.exit_code == 0, result.output
    out = result.stdout  # stderr holds the progress bar
    lines = out.splitlines()
    assert all(len(line) <= WIDTH for line in lines), max(lines, key=len)
    assert "…" not in out and "subcutaneous fat" in out  # tissue names whole, not cut off


# ------------------------------------------------------------------ --model
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A study run folder as a training study leaves it: model.pt beside checkpoint.pt."""
    from common.model import ModelSpec, build_model, save_model
    from server.checkpoint import EarlyStopping, TrainingState, save_checkpoint

    folder = tmp_path_factory.mktemp("run")
    spec = ModelSpec(encoder="resnet18", image_size=64)
    model = build_model(spec)
    save_model(folder / "model.pt", model, spec)
    save_checkpoint(folder, TrainingState(1, model.state_dict(), EarlyStopping(patience=2)))
    return folder


def test_model_given_a_run_folder_uses_its_model_pt(demo_site: Path, run_dir: Path) -> None:
    code, out = _run(
        "site", "evaluate", str(demo_site), "--model", str(run_dir), "--json", "--no-discrepancy"
    )
    assert code == 0, out
    assert json.loads(out)["task"] == "evaluate"


def test_model_given_a_text_file_says_it_is_not_a_model(demo_site: Path, tmp_path: Path) -> None:
    notes = tmp_path / "model.txt"
    notes.write_text((Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8"), encoding="utf-8")
    code, out = _run("site", "evaluate", str(demo_site), "--model", str(notes))
    text = " ".join(out.split())
    assert code == 1
    assert "not a sarcofed model" in text and "model.pt" in text and "model.txt" in text
    assert "weights_only" not in text and "arbitrary code" not in text


def test_model_given_an_unsafe_pytorch_file_never_advises_weights_only_false(
    demo_site: Path, tmp_path: Path
) -> None:
    import torch

    pickled = tmp_path / "pickled.pt"
    torch.save({"obj": Path("x")}, pickled)  # a PyTorch archive that needs full unpickling
    code, out = _run("site", "evaluate", str(demo_site), "--model", str(pickled))
    assert code == 1
    assert "not a sarcofed model" in " ".join(out.split()) and "weights_only" not in out


def test_model_given_the_training_checkpoint_points_at_model_pt(demo_site: Path, run_dir: Path) -> None:
    code, out = _run("site", "evaluate", str(demo_site), "--model", str(run_dir / "checkpoint.pt"))
    text = " ".join(out.split())
    assert code == 1
    assert "training checkpoint" in text and f"use {run_dir / 'model.pt'} beside it" in text
    assert "save_model" not in text


def test_model_given_a_folder_without_a_model_says_so(demo_site: Path, tmp_path: Path) -> None:
    code, out = _run("site", "evaluate", str(demo_site), "--model", str(tmp_path))
    assert code == 1
    assert "a folder without a model.pt in it" in " ".join(out.split())


# ------------------------------------------------------------------ site workbench
def test_workbench_without_a_folder_is_a_usage_error() -> None:
    code, out = _run("site", "workbench")
    assert code == 2
    assert "Missing argument 'FOLDER'" in out and "None" not in out


def test_workbench_refuses_a_wrong_model_before_it_serves(tmp_path: Path, run_dir: Path) -> None:
    code, out = _run("site", "workbench", str(tmp_path), "--model", str(run_dir / "checkpoint.pt"))
    assert code == 2
    assert "training checkpoint" in " ".join(out.split())


# ------------------------------------------------------------------ site check output
def test_site_check_prints_a_repeated_fix_once_with_its_count(demo_site: Path, tmp_path: Path) -> None:
    import shutil

    site = tmp_path / "undeclared"
    shutil.copytree(demo_site, site)
    toml = (site / "site.toml").read_text(encoding="utf-8")
    (site / "site.toml").write_text(re.sub(r"(?m)^background = \[2\].*$", "background = []", toml))
    code, out = _run("site", "check", str(site))
    text = " ".join(out.split())
    assert code == 1
    fix = "declared nowhere in site.toml [labels]; add each to muscle"  # [labels] verbatim, not markup
    assert text.count(fix) == 1
    assert "undeclared_label_value, 6 rows:" in text and "and 3 more" in text
    assert all(len(line) <= WIDTH for line in out.splitlines())
