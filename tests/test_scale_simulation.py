"""Many sites for real: thirty simulated hospitals on Flower's simulation engine (``flwr run`` with
30 SuperNodes) in one evaluate-only study; every site is in report.json with status ok and the
slices it scored. The local SuperLink runs on free ports under a private FLWR_HOME and is stopped
by pid afterwards."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from flower_home import private_flower_home

from protocols.report import StudyReport
from server.demo_study import make_demo_sites
from server.flwr_cli import flwr_run

ROOT = Path(__file__).resolve().parents[1]
N_SITES = 30
SLICES = 6  # the default site policy releases nothing under 5 slices
SIZE = 64
ENCODER = "tu-mobilenetv3_small_050"


@pytest.fixture
def flower_home(tmp_path: Path) -> Iterator[dict[str, str]]:
    with private_flower_home(tmp_path) as env:
        yield env


@pytest.mark.slow
def test_thirty_simulated_sites_in_one_evaluate_study_are_all_reported(
    tmp_path: Path, flower_home: dict[str, str]
) -> None:
    from common.model import ModelSpec, build_model, save_model

    spec = ModelSpec(encoder=ENCODER, image_size=SIZE)
    model = save_model(tmp_path / "model.pt", build_model(spec), spec)
    demo = {"demo.dir": str(tmp_path / "sites"), "demo.slices": SLICES, "demo.size": SIZE}
    sites = make_demo_sites(ROOT, demo, N_SITES)
    config = {
        **demo,
        "study.mode": "evaluate",
        "study.model": str(model),
        "study.min-sites": N_SITES,
        "study.round-timeout": 600.0,
        "study.output-dir": str(tmp_path / "studies"),
        "study.run-name": "thirty-sites",
        "model.encoder": ENCODER,
        "model.image-size": SIZE,
        "eval.batch-size": SLICES,
    }
    started = time.monotonic()
    outcome = flwr_run(
        ROOT, run_config=config, federation_config={"num-supernodes": N_SITES}, env=flower_home, timeout=900
    )
    seconds = time.monotonic() - started
    assert outcome.ok, outcome.output[-4000:]
    report = StudyReport.model_validate_json(
        (tmp_path / "studies" / "thirty-sites" / "report.json").read_text()
    )
    names = {(site / "site.toml").read_text(encoding="utf-8").split('"')[1] for site in sites}
    assert len(names) == N_SITES
    by_site = {s.site: s for s in report.sites}
    assert set(by_site) == names
    for name, result in by_site.items():
        assert result.status == "ok", (name, result.status, result.reason)
        assert result.payload is not None and result.payload.n_used == SLICES, (name, result.payload)
    print(f"{N_SITES}-site simulated evaluate study: {seconds:.0f} s")
