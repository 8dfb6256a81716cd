"""``sarcofed study demo`` makes the simulated hospitals before ``flwr run``, from the run
config exactly as the ClientApps will see it (pyproject defaults + overrides)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from common.demo.hospitals import SITE_PROFILES, STUDY_ORDER, make_site, study_site_profile
from common.errors import SarcofedError
from protocols.study import DEMO_STUDY, StudyConfig
from server.demo_study import make_demo_sites, simulation_study

ROOT = Path(__file__).resolve().parents[1]


def test_the_study_is_pyprojects_run_config_with_the_overrides() -> None:
    defaults = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["flwr"]["app"]
    study = simulation_study(ROOT, {})
    assert study.demo.slices == defaults["config"]["demo.slices"]
    assert study.demo.size == defaults["config"]["demo.size"]
    assert simulation_study(ROOT, {"demo.slices": 3}).demo.slices == 3
    with pytest.raises(SarcofedError, match=r"demo\.slicez"):
        simulation_study(ROOT, {"demo.slicez": 3})


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_missing_demo_sites_are_made_as_the_simulated_sites_made_them(tmp_path: Path) -> None:
    demo_dir = tmp_path / "demo-sites"
    kept = demo_dir / "site-1"
    kept.mkdir(parents=True)
    (kept / "manifest.csv").write_text("image,label\nct/a.dcm,labels/a.png\n", encoding="utf-8")
    config: dict[str, str | int] = {"demo.dir": str(demo_dir), "demo.slices": 2, "demo.size": 48}

    sites = make_demo_sites(ROOT, config, 3)

    assert sites == [demo_dir / "site-0", demo_dir / "site-1", demo_dir / "site-2"]
    assert _files(kept) == {"manifest.csv": b"image,label\nct/a.dcm,labels/a.png\n"}  # used as it is
    for partition in (0, 2):  # profile, seed and tag of the partition: the same data as before
        expected = make_site(
            tmp_path / f"expected-{partition}",
            study_site_profile(partition),
            slices=2,
            size=48,
            seed=partition,
            site_tag=str(partition),
        )
        assert _files(sites[partition]) == _files(expected)
    assert make_demo_sites(ROOT, config, 3) == sites  # a second call makes nothing


def test_the_demo_study_trains_on_the_protocols_hospitals_and_validates_the_others_externally() -> None:
    """The seed's study: hospitals that label by the study protocol train; the psoas-excluding one
    (the seed's other hospital) comes next, then every other convention, all validated only."""
    lineup = [study_site_profile(partition) for partition in range(len(SITE_PROFILES))]
    assert sorted(STUDY_ORDER) == list(range(len(SITE_PROFILES)))  # every demo hospital, once
    assert [p.follows_reference for p in lineup[:2]] == [True, True]
    assert not lineup[2].convention.include_psoas
    excluded = StudyConfig.from_run_config(DEMO_STUDY).study.exclude_from_training
    assert sorted(excluded) == sorted(p.name for p in lineup if not p.follows_reference)
    # what `flwr run .` and `sarcofed study demo` run: pyproject's config, with nothing given
    assert simulation_study(ROOT, {}).study.exclude_from_training == excluded


def test_the_demo_study_prints_the_reports_summary_when_it_finishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After "demo study finished": each site with its role and n, each pooled group (from report.json)."""
    from typer import Typer
    from typer.testing import CliRunner

    import server.demo_study as demo_study
    from server.deploy import FINAL_OK
    from server.flwr_cli import RunOutcome
    from server.report import summary_lines
    from tests.report_builders import study_report

    run_dir = tmp_path / "studies" / "demo-42"
    run_dir.mkdir(parents=True)
    report = study_report()
    (run_dir / "report.json").write_text(report.model_dump_json(), encoding="utf-8")
    (tmp_path / "studies" / "LATEST").write_text(str(run_dir), encoding="utf-8")
    monkeypatch.setattr(demo_study, "make_demo_sites", lambda app, config, sites: [])
    monkeypatch.setattr(demo_study, "local_superlink_pids", lambda: [])
    monkeypatch.setattr(demo_study, "flwr_run", lambda *a, **kw: RunOutcome(42, FINAL_OK, "", ""))
    cli = Typer()
    cli.command()(demo_study.demo_study_cmd)

    result = CliRunner().invoke(cli, ["--home", str(tmp_path), "--quiet"])

    assert result.exit_code == 0, result.output
    printed = result.output.splitlines()
    finished = next(i for i, line in enumerate(printed) if "demo study finished" in line)
    expected = summary_lines(report)
    assert printed[finished + 1 : finished + 1 + len(expected)] == expected


def test_the_summary_of_a_run_without_a_readable_report_says_so(tmp_path: Path) -> None:
    from server.demo_study import study_summary

    (line,) = study_summary(tmp_path)
    assert str(tmp_path / "report.json") in line and "cannot read the study report" in line
