"""Convention-aware training end to end on Flower's simulation engine (``flwr run``, issue 17).

A reference-convention hospital and the psoas-excluding hospital train the study model with
``train.convention-aware`` on; a second reference-convention hospital is held out of training.
The psoas-excluding site's own audit finds its convention, its loss ignores the psoas region,
its training replies say so as a share of its labelled pixels, and the report states it. The
model still learns psoas: on the held-out reference hospital, the share of the labelled psoas
(the labelled muscle of the body frame's psoas region) it predicts muscle is clearly higher than
with the plain loss on the same data (the same study run again), while the rest of the muscle
is learnt alike. Measured values at PSOAS_MARGIN.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from flower_home import private_flower_home

from common.dataset import LoadedSlice, iter_slices, load_site
from common.demo.hospitals import study_site_profile
from common.discrepancy.frame import REGION_NAMES, body_frame
from common.inference import predict_masks
from common.model import load_model
from common.paths import simulated_site_dir
from protocols import keys
from protocols.report import StudyReport
from server.demo_study import make_demo_sites
from server.flwr_cli import flwr_run

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

#: partitions 0 and 1 label by the protocol, partition 2 leaves the psoas out (STUDY_ORDER)
REFERENCE_A, HELD_OUT, NO_PSOAS = (study_site_profile(p).name for p in range(3))
CONFIG = {
    "study.mode": "train",
    "study.num-rounds": 4,
    "study.min-sites": 2,
    "study.exclude-from-training": HELD_OUT,
    "study.round-timeout": 300.0,
    "model.encoder": "resnet18",
    "model.image-size": 96,
    "demo.slices": 12,
    "demo.size": 128,  # the audit's spine checks need the psoas a few pixels wide
    "train.local-epochs": 3,
    "train.val-fraction": 0.0,
    "train.test-fraction": 0.0,
    "train.convention-aware": True,
}
#: Psoas recall on the held-out hospital, convention-aware minus plain. Measured on this setting
#: (2026-12-02, CPU): psoas 0.37 vs 0.24, the rest of the muscle 0.85 vs 0.85. Both are low in
#: absolute terms (4 rounds of 12 slices at 96 px); the psoas is learnt from one site's labels.
PSOAS_MARGIN = 0.08


@pytest.fixture
def flower_home(tmp_path: Path) -> Iterator[dict[str, str]]:
    """Free ports, never another test's SuperLink (which would run this study with its own code)."""
    with private_flower_home(tmp_path) as env:
        yield env


def _psoas_recall(site_dir: Path, model_path: Path) -> tuple[float, float]:
    """(share of the labelled psoas-region muscle predicted muscle, same share for all other muscle)."""
    loaded = load_model(model_path)
    slices = [s for s in iter_slices(load_site(site_dir)) if isinstance(s, LoadedSlice)]
    predicted = predict_masks(loaded.model, loaded.spec, [s.ct.hu for s in slices])
    hit = n = other_hit = other_n = 0
    for s, pred in zip(slices, predicted, strict=True):
        frame = body_frame(s.ct.hu, s.ct.spacing_mm)
        muscle = s.label == 1
        if not frame.spine_found:
            continue
        rows, cols = np.nonzero(muscle)
        psoas = np.zeros_like(muscle)
        psoas[rows, cols] = frame.regions(rows, cols) == REGION_NAMES.index("psoas")
        hit += int(np.count_nonzero(psoas & (pred == 1)))
        n += int(np.count_nonzero(psoas))
        other_hit += int(np.count_nonzero(muscle & ~psoas & (pred == 1)))
        other_n += int(np.count_nonzero(muscle & ~psoas))
    assert n > 0 and other_n > 0
    return hit / n, other_hit / other_n


def _run(name: str, aware: bool, tmp_path: Path, env: dict[str, str]) -> Path:
    config = CONFIG | {
        "train.convention-aware": aware,
        "study.output-dir": str(tmp_path / "studies"),
        "study.run-name": name,
        "demo.dir": str(tmp_path / "sites"),
    }
    make_demo_sites(ROOT, config, 3)
    outcome = flwr_run(ROOT, run_config=config, federation_config={"num-supernodes": 3}, env=env, timeout=600)
    assert outcome.ok, outcome.output[-4000:]
    return tmp_path / "studies" / name


def test_a_psoas_excluding_site_trains_convention_aware_and_the_model_still_learns_psoas(
    tmp_path: Path, flower_home: dict[str, str]
) -> None:
    run_dir = _run("aware", True, tmp_path, flower_home)
    rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    share_key, slices_key = keys.convention_keys("psoas")
    for record in rounds:
        assert record["sites_replied"] == sorted([REFERENCE_A, NO_PSOAS])
        no_psoas, reference = record["per_site"][NO_PSOAS], record["per_site"][REFERENCE_A]
        # the site found its own convention and says how much of its labels it set aside
        assert no_psoas[keys.CONVENTION_AWARE] == 1.0 and 0.05 < no_psoas[share_key] < 0.4
        assert no_psoas[slices_key] >= 5
        # the reference site trained convention-aware too, and had nothing to adjust
        assert reference[keys.CONVENTION_AWARE] == 1.0
        assert not [k for k in reference if k.endswith("-share")]
    report = StudyReport.model_validate_json((run_dir / "report.json").read_text())
    assert "train.convention-aware true (default false)" in " ".join(report.notes)
    assert (
        f"{NO_PSOAS}: trained convention-aware (train.convention-aware): psoas region ignored"
        in (run_dir / "report.md").read_text()
    )

    # The same study with the plain loss: the psoas-excluding site teaches "no psoas".
    plain_dir = _run("plain", False, tmp_path, flower_home)
    plain_rounds = (plain_dir / "rounds.jsonl").read_text()
    assert keys.CONVENTION_AWARE not in plain_rounds
    held_out = simulated_site_dir(tmp_path / "sites", 1)
    psoas, other = _psoas_recall(held_out, run_dir / "model.pt")
    plain_psoas, plain_other = _psoas_recall(held_out, plain_dir / "model.pt")
    # the rest of the muscle is learnt alike; the psoas clearly better with convention-aware training
    assert abs(other - plain_other) < 0.1, (other, plain_other)
    assert psoas >= plain_psoas + PSOAS_MARGIN, (psoas, plain_psoas)
