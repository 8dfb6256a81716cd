"""The demo study end to end on Flower's real simulation engine (``flwr run``): the seed's story.

One study, run as ``sarcofed study demo`` runs it (pyproject's run config, the demo hospitals
made beforehand by ``make_demo_sites``), plus a fourth hospital that cannot train (its files
are missing). The two hospitals that label by the study protocol train the model; the
psoas-excluding hospital is never sent training and is validated as an external site, like
the seed's other hospital. ``report.json`` tells the seed's story: the internal test split
reaches muscle IoU >= 0.9 on >= 80% of its slices, the psoas hospital drops, and its finding
(psoas left out) is attributed to its labelling, not to the model; the reference-convention
hospitals have no such finding. The broken hospital fails with its reason and training goes
on; the report's seed tables equal a recomputation from per-slice metrics at the sites.
(Resuming a study from its checkpoint is tested on the deployment engine, where a SuperLink
restart stops it: tests/test_deployment_faults.py. Here it cost one more training round and a
second validation of every site, in CI's slowest test.)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from flower_home import private_flower_home

from common.dataset import load_site
from common.demo.hospitals import study_site_profile
from common.evaluation import Scope, evaluate_site
from common.metrics import bin_name
from common.splits import split_site
from protocols.classes import IOU_BINS
from protocols.payloads import ClassScores
from protocols.report import StudyReport
from protocols.study import StudyConfig, recipe_note
from server.demo_study import make_demo_sites, simulation_study
from server.flwr_cli import flwr_run

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
#: The seed's headline: muscle IoU >= 0.9 (its internal test set: 92% of slices).
TOP_BIN = IOU_BINS[0]
#: The demo's hospitals, partition by partition (``sarcofed study demo``'s three).
REFERENCE_A, REFERENCE_G, NO_PSOAS = (study_site_profile(p).name for p in range(3))
PSOAS_FINDING = ("muscle", "site_excludes", "psoas")


@pytest.fixture
def flower_home(tmp_path: Path) -> Iterator[dict[str, str]]:
    with private_flower_home(tmp_path, http_port=39191, control_port=39193) as env:
        yield env


def _top_share(scores: ClassScores) -> float:
    """Share of the binned slices in the top bin (muscle IoU >= 0.9)."""
    return scores.bins[TOP_BIN] / sum(scores.bins.values())


#: Issue 13's goal: muscle IoU >= 0.9 on >= 80% of the internal test slices (15 of 18). Without
#: augmentation the demo sat at the floor: 16/18 on one CPU, 14/18 on another (AVX512-BF16, in
#: bf16 and in fp32 alike, 10 or 12 rounds), the noisy hospital's held-out slices at 0.87-0.89
#: while its training slices scored 0.92-0.97. With flips and shifts (``train.augment``), on the
#: AVX512-BF16 CPU: 18/18 in bf16 (the lowest slice 0.903, 5 min), 16/18 in fp32 (8 min).
INTERNAL_SHARE_FLOOR = 0.8


def assert_the_seeds_story(report: StudyReport, study: StudyConfig) -> None:
    """What the demo study's report.json must show (the issue's acceptance): the model works on the
    internal test split, the psoas hospital drops and its labelling is named as the reason, the
    reference-convention hospitals have no convention of their own, and the harmonised picture."""
    by_site = {s.site: s for s in report.sites}
    # The model works: issue 13 asks muscle IoU >= 0.9 on >= 80% of the internal test slices.
    assert report.pooled is not None
    internal = report.pooled.group("internal")
    external = report.pooled.group("external")
    assert internal is not None and external is not None
    assert sorted(internal.results.sites) == sorted([REFERENCE_A, REFERENCE_G])
    assert external.results.sites == [NO_PSOAS]
    internal_share = _top_share(internal.results.scores["muscle"])
    assert internal_share >= INTERNAL_SHARE_FLOOR, internal.results.scores["muscle"].bins
    # The psoas hospital, scored on every slice, drops; its labelling is named as the reason.
    psoas = by_site[NO_PSOAS]
    assert psoas.role == "external" and psoas.payload is not None
    assert (psoas.payload.split, psoas.payload.n_used) == ("all", study.demo.slices)
    assert _top_share(psoas.payload.scores["muscle"]) <= internal_share - 0.3, psoas.payload.scores["muscle"]
    attributed = {(f.tissue, f.direction, f.region): f.attribution for f in psoas.findings if f.systematic}
    assert attributed.get(PSOAS_FINDING) == "site_convention", attributed
    # ... and its verdict says so
    assert psoas.verdict is not None and psoas.verdict.code == "explained_by_labelling", psoas.verdict
    assert "psoas" in psoas.verdict.sentence, psoas.verdict
    # Hospitals that follow the protocol show the model's own errors, never a convention of theirs.
    for name in (REFERENCE_A, REFERENCE_G):
        conventions = [f.sentence for f in by_site[name].findings if f.attribution == "site_convention"]
        assert conventions == [], (name, conventions)
        verdict = by_site[name].verdict
        assert verdict is not None and verdict.code != "explained_by_labelling", (name, verdict)
    # And the harmonised picture (both masks under the protocol's HU ranges) is there for each group.
    assert psoas.payload.harmonised_scores is not None
    assert external.results.harmonised_scores is not None and internal.results.harmonised_scores is not None


@pytest.mark.timeout(1500)  # its own flwr run waits up to 1200 s; the suite-wide 900 s cut it first
def test_the_demo_study_tells_the_seeds_story_and_survives_a_broken_site(
    tmp_path: Path, flower_home: dict[str, str]
) -> None:
    demo_dir = tmp_path / "sites"
    make_demo_sites(ROOT, {"demo.dir": str(demo_dir)}, 3)  # as `sarcofed study demo` makes them
    # site-3 exists but every file it lists is missing: it cannot train, nor be evaluated.
    broken = demo_dir / "site-3"
    broken.mkdir(parents=True)
    (broken / "site.toml").write_text(
        'name = "hospital-broken"\n[labels]\nmuscle=[1]\nsubcutaneous_fat=[2]\nvisceral_fat=[3]\n'
    )
    (broken / "manifest.csv").write_text("image,label\nct/missing.dcm,labels/missing.png\n")
    studies = tmp_path / "studies"
    # nothing of the study itself is set here: it is the demo study, pyproject's run config
    config = {"study.output-dir": str(studies), "study.run-name": "demo", "demo.dir": str(demo_dir)}
    study = simulation_study(ROOT, config)
    rounds = study.study.num_rounds
    first = flwr_run(
        ROOT, run_config=config, federation_config={"num-supernodes": 4}, env=flower_home, timeout=1200
    )
    assert first.ok, first.output[-4000:]
    run_dir = studies / "demo"
    report = StudyReport.model_validate_json((run_dir / "report.json").read_text())

    # Training: only the protocol's hospitals (and the broken one, which failed with its reason).
    assert [r.round for r in report.training] == list(range(1, rounds + 1))
    for record in report.training:
        assert record.sites_sent == sorted([REFERENCE_A, REFERENCE_G, "hospital-broken"])
        assert record.sites_replied == sorted([REFERENCE_A, REFERENCE_G])
        assert "no usable slice" in record.sites_failed["hospital-broken"]
        assert record.pooled_val_loss is not None
    assert (run_dir / "model.pt").exists() and (run_dir / "checkpoint.pt").exists()
    # the demo's schedule is not the seed's recipe: the report says how it differs
    assert recipe_note(study) in report.notes

    # Validation: every site reported, the broken one with its reason.
    by_site = {s.site: s for s in report.sites}
    # No usable slice: the site's own policy (min-slices) refuses to reply, and says why.
    assert by_site["hospital-broken"].status in ("no_usable_slices", "refused")
    assert "usable slice" in (by_site["hospital-broken"].reason or "")
    assert sorted(s.site for s in report.sites if s.status == "ok") == sorted(
        [REFERENCE_A, REFERENCE_G, NO_PSOAS]
    )
    assert [by_site[s].role for s in (REFERENCE_A, REFERENCE_G, NO_PSOAS)] == [
        "internal",
        "internal",
        "external",
    ]

    assert_the_seeds_story(report, study)

    # The internal sites were scored on their held-out test patients only, and the seed's tables
    # equal an independent recomputation from per-slice metrics on exactly those.
    for name in (REFERENCE_A, REFERENCE_G):
        result = by_site[name]
        site_dir = next(
            p for p in demo_dir.iterdir() if p.is_dir() and f'"{name}"' in (p / "site.toml").read_text()
        )
        site = load_site(site_dir)
        test_rows = split_site(site, study.train).test
        assert result.payload is not None
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
