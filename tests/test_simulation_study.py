"""The demo study end to end on Flower's real simulation engine (``flwr run``).

One study: three simulated hospitals (made beforehand by ``make_demo_sites``, as
``sarcofed study demo`` makes them), one of which cannot train (its files are missing);
training continues with the others, validation reports every site, and the report's
seed tables equal a recomputation from per-slice metrics at the sites. Then the stopped
study is resumed for one more round from its checkpoint.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from common.dataset import load_site
from common.evaluation import Scope, evaluate_site
from common.metrics import bin_name
from common.splits import split_site
from protocols.classes import IOU_BINS
from protocols.report import StudyReport
from protocols.study import StudyConfig
from server.demo_study import make_demo_sites
from server.flwr_cli import flower_env, flwr_run, local_superlink_pids, stop_processes

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

SMALL = {
    "model.encoder": "resnet18",
    "model.image-size": 64,
    # >= 5 training and >= 5 test slices per site: the default site policy releases nothing smaller;
    # >= 5 validation patients (6 at both sites): fewer and the sites withhold their validation metrics
    "demo.slices": 20,
    "demo.size": 96,
    "train.local-epochs": 1,
    "train.val-fraction": 0.35,
    "train.test-fraction": 0.3,
    "study.round-timeout": 300.0,
}


@pytest.fixture
def flower_home(tmp_path: Path):
    """A private FLWR_HOME and local-SuperLink ports; every SuperLink started is stopped by pid."""
    home = tmp_path / "flwr-home"
    env = flower_env(
        {
            "FLWR_HOME": str(home),
            "SARCOFED_HOME": str(tmp_path / "sarcofed-home"),
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": "39191",
            "FLWR_LOCAL_CONTROL_API_PORT": "39193",
        }
    )
    yield env
    stop_processes(local_superlink_pids(home))


def test_demo_study_trains_validates_reports_and_resumes(tmp_path: Path, flower_home: dict[str, str]) -> None:
    demo_dir = tmp_path / "sites"
    # site-2 exists but every file it lists is missing: it cannot train, nor be evaluated.
    broken = demo_dir / "site-2"
    broken.mkdir(parents=True)
    (broken / "site.toml").write_text(
        'name = "hospital-broken"\n[labels]\nmuscle=[1]\nsubcutaneous_fat=[2]\nvisceral_fat=[3]\n'
    )
    (broken / "manifest.csv").write_text("image,label\nct/missing.dcm,labels/missing.png\n")
    studies = tmp_path / "studies"
    config = SMALL | {
        "study.num-rounds": 2,
        "study.output-dir": str(studies),
        "study.run-name": "resumable",
        "demo.dir": str(demo_dir),
    }
    make_demo_sites(ROOT, config, 3)  # as `sarcofed study demo` does; site-2 is kept as it is
    first = flwr_run(
        ROOT, run_config=config, federation_config={"num-supernodes": 3}, env=flower_home, timeout=900
    )
    assert first.ok, first.output[-4000:]
    run_dir = studies / "resumable"
    report = StudyReport.model_validate_json((run_dir / "report.json").read_text())

    # Training: two rounds, the broken site failed with its reason, the others replied.
    assert [r.round for r in report.training] == [1, 2]
    for record in report.training:
        assert sorted(record.sites_replied) == sorted(s for s in record.sites_sent if s != "hospital-broken")
        assert "no usable slice" in record.sites_failed["hospital-broken"]
        assert record.pooled_val_loss is not None
    assert (run_dir / "model.pt").exists() and (run_dir / "checkpoint.pt").exists()

    # Validation: every site reported, the broken one with its reason.
    by_site = {s.site: s for s in report.sites}
    # No usable slice: the site's own policy (min-slices) refuses to reply, and says why.
    assert by_site["hospital-broken"].status in ("no_usable_slices", "refused")
    assert "usable slice" in (by_site["hospital-broken"].reason or "")
    ok_sites = [s for s in report.sites if s.status == "ok"]
    assert len(ok_sites) == 2

    # Both sites trained the model: internal, scored on their held-out test patients only, and the
    # seed's tables equal an independent recomputation from per-slice metrics on exactly those.
    study = StudyConfig.from_run_config(config)
    for result in ok_sites:
        site_dir = next(
            p
            for p in demo_dir.iterdir()
            if p.is_dir() and f'"{result.site}"' in (p / "site.toml").read_text()
        )
        site = load_site(site_dir)
        test_rows = split_site(site, study.train).test
        assert result.role == "internal" and result.payload is not None
        assert (result.payload.split, result.payload.n_in_split) == ("test", len(test_rows))
        scope = Scope(role="internal", rows=test_rows)
        payload, records = evaluate_site(site, run_dir / "model.pt", batch_size=4, scope=scope)
        assert result.payload.model_hash == payload.model_hash and result.payload.n_used == len(records)
        for cls in ("muscle", "subcutaneous_fat", "visceral_fat", "msv"):
            expected = Counter(bin_name(r.iou[cls]) for r in records if r.iou[cls] is not None)
            assert result.payload.scores[cls].bins == {b: expected.get(b, 0) for b in IOU_BINS}, cls
    assert (run_dir / "report.html").exists() and (
        run_dir / "tables" / "pooled_internal_iou_bins.csv"
    ).exists()

    # Resume: one more round continues from the checkpoint (round 3), weights from round 2.
    weights_before = report.training[-1].weights_hash
    second = flwr_run(
        ROOT,
        run_config=config | {"study.num-rounds": 3, "study.resume": True},
        federation_config={"num-supernodes": 3},
        env=flower_home,
        timeout=900,
    )
    assert second.ok, second.output[-4000:]
    rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    resumed = StudyReport.model_validate_json((run_dir / "report.json").read_text())
    assert [r.round for r in resumed.training] == [1, 2, 3]
    assert resumed.training[1].weights_hash == weights_before
    assert resumed.training[2].weights_hash != weights_before
    # Every round started from the weights the previous round produced, across the resume too.
    assert resumed.training[2].start_weights_hash == weights_before
    assert resumed.training[1].start_weights_hash == resumed.training[0].weights_hash


def test_sites_slower_than_the_round_timeout_are_reported_with_the_reason(
    tmp_path: Path, flower_home: dict[str, str]
) -> None:
    """A 1-s validation round: no site can score 256-px slices with resnet34 in time."""
    from common.model import ModelSpec, build_model, save_model

    spec = ModelSpec(encoder="resnet34", image_size=256)
    model = save_model(tmp_path / "model.pt", build_model(spec), spec)
    config = SMALL | {
        "study.mode": "evaluate",
        "study.model": str(model),
        "study.round-timeout": 1.0,
        "study.output-dir": str(tmp_path / "studies"),
        "study.run-name": "too-slow",
        "demo.dir": str(tmp_path / "sites"),
        "demo.size": 256,
    }
    make_demo_sites(ROOT, config, 2)
    outcome = flwr_run(
        ROOT, run_config=config, federation_config={"num-supernodes": 2}, env=flower_home, timeout=900
    )
    assert outcome.ok, outcome.output[-4000:]  # late sites do not fail the study...
    report = StudyReport.model_validate_json((tmp_path / "studies" / "too-slow" / "report.json").read_text())
    assert len(report.sites) == 2
    for site in report.sites:  # ...they are listed, by name, with the reason
        assert site.site.startswith("demo-hospital-"), site.site
        assert site.status == "timeout" and "round-timeout" in (site.reason or "")
    assert "timeout" in (tmp_path / "studies" / "too-slow" / "report.md").read_text()
