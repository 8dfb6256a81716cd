"""Proposing [labels] from the data (common.label_guess) and ``site check`` catching a wrong mapping."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from common.check import check_site
from common.dataset import load_site
from common.demo.hospitals import SITE_PROFILES, SiteProfile, make_site
from common.label_guess import MIN_PIXELS, mapping_verdict, propose_mapping
from common.mask_values import LabelValueAccumulator, ValueStats
from protocols.protocol import LabelProtocol
from protocols.site import LabelMap
from server.cli import app

runner = CliRunner()


def _truth(profile: SiteProfile) -> LabelMap:
    return profile.values.label_map()


def _swap(root: Path, a: str, b: str) -> None:
    """Swap the value lists of classes ``a`` and ``b`` in site.toml's [labels]."""
    path = root / "site.toml"
    text = path.read_text(encoding="utf-8")
    labels = tomllib.loads(text)["labels"]
    swapped = {a: labels[b], b: labels[a]}
    text = re.sub(
        rf"^({a}|{b}) = \[.*\]$", lambda m: f"{m.group(1)} = {swapped[m.group(1)]}", text, flags=re.M
    )
    path.write_text(text, encoding="utf-8")
    assert tomllib.loads(text)["labels"][a] == labels[b]


def _stats(value: int, **over: object) -> ValueStats:
    base: dict[str, object] = dict(
        value=value,
        pixels=1000,
        slices=3,
        share_muscle_hu=0.0,
        share_subcutaneous_fat_hu=0.0,
        share_visceral_fat_hu=0.0,
        mean_hu=0.0,
        share_outside_body=0.0,
        share_under_skin=0.0,
    )
    return ValueStats.model_validate(base | over)


def test_accumulator_counts_by_hand() -> None:
    """A 12x12 body of known HU: counts, shares, mean, outside-body and touching by hand."""
    hu = np.full((12, 12), -1000.0)
    hu[2:10, 2:10] = -100.0  # body: fat everywhere ...
    hu[4:8, 4:8] = 50.0  # ... muscle in the middle
    raw = np.zeros((12, 12), dtype=np.int64)
    raw[4:8, 4:8] = 1  # 16 muscle pixels
    raw[2, 2:10] = 7  # 8 fat pixels on the body's top edge (under the skin)
    raw[0, 0:3] = 9  # 3 pixels in the air
    acc = LabelValueAccumulator()
    acc.add(hu, (1.0, 1.0), raw)
    acc.add(hu, (1.0, 1.0), np.zeros_like(raw))  # an empty mask counts a slice and nothing else
    stats = {s.value: s for s in acc.finalise()}
    assert set(stats) == {1, 7, 9} and acc.n_slices == 2
    assert stats[1].pixels == 16 and stats[1].share_muscle_hu == 1.0 and stats[1].mean_hu == 50.0
    assert stats[1].share_under_skin == 0.0 and stats[1].touching == {}
    assert stats[1].share_around_spine is None  # no bone, no spine: not known rather than 0
    assert stats[7].share_subcutaneous_fat_hu == 1.0 and stats[7].share_visceral_fat_hu == 1.0
    assert stats[7].share_under_skin == 1.0 and stats[7].share_outside_body == 0.0
    assert stats[9].share_outside_body == 1.0 and stats[9].mean_hu == -1000.0
    assert stats[9].touching == {}  # row 0 cols 0-2 do not touch row 2
    # a 'mask' with more distinct values than a label mask has (an image?) adds nothing
    acc.add(hu, (1.0, 1.0), np.arange(144).reshape(12, 12))
    acc.add(np.where(raw == 1, np.inf, hu), (1.0, 1.0), raw)  # as is a slice whose HU overflowed
    assert acc.n_skipped == 2 and acc.n_slices == 2 and {s.value for s in acc.finalise()} == {1, 7, 9}


def test_rules_on_hand_made_statistics() -> None:
    muscle = _stats(3, share_muscle_hu=0.95, mean_hu=40.0, touching={8: 0.3})
    sat = _stats(8, share_subcutaneous_fat_hu=1.0, share_visceral_fat_hu=0.8, share_under_skin=0.2)
    vat = _stats(4, share_subcutaneous_fat_hu=0.98, share_visceral_fat_hu=0.9, touching={3: 0.2})
    imat = _stats(6, pixels=100, share_subcutaneous_fat_hu=1.0, touching={3: 0.9, 4: 0.3})
    table = _stats(11, share_outside_body=0.9, mean_hu=-900.0)
    tiny = _stats(12, pixels=MIN_PIXELS - 1, share_muscle_hu=1.0)
    bone = _stats(13, mean_hu=600.0)
    proposal = propose_mapping((muscle, sat, vat, imat, table, tiny, bone))
    roles = {g.value: (g.role, g.clear) for g in proposal.guesses}
    assert roles == {
        3: ("muscle", True),
        8: ("subcutaneous_fat", True),
        4: ("visceral_fat", True),
        6: ("imat", True),
        11: ("background", True),
        12: ("background", False),
        13: ("background", True),
    }
    assert proposal.labels == LabelMap(
        muscle=[3], subcutaneous_fat=[8], visceral_fat=[4], background=[6, 11, 12, 13]
    )
    assert not proposal.slice_o_matic
    # a protocol that counts intramuscular fat as muscle gets IMAT proposed as muscle
    imat_in = LabelProtocol(name="imat-in", imat_in_muscle=True)
    labels = propose_mapping((muscle, sat, vat, imat), imat_in).labels
    assert labels is not None and labels.muscle == [3, 6] and labels.background == []
    # no fat value away from the skin: no complete mapping, and it says which tissue is missing
    partial = propose_mapping((muscle, sat))
    assert partial.labels is None and "visceral fat" in partial.note


def test_slice_o_matic_values_are_recognised() -> None:
    som = (
        _stats(1, share_muscle_hu=0.9),
        _stats(2, pixels=10, share_subcutaneous_fat_hu=1.0),  # too few pixels: the convention decides
        _stats(5, share_subcutaneous_fat_hu=1.0),
        _stats(7, share_subcutaneous_fat_hu=1.0, share_under_skin=0.3),
    )
    proposal = propose_mapping(som)
    assert proposal.slice_o_matic and "Slice-O-Matic" in proposal.note and "agree" in proposal.note
    assert {g.value: g.role for g in proposal.guesses}[2] == "imat"
    assert proposal.labels == LabelMap(muscle=[1], subcutaneous_fat=[7], visceral_fat=[5], background=[2])
    assert not propose_mapping((_stats(1, share_muscle_hu=0.9), _stats(3), _stats(7))).slice_o_matic


def test_verdict_tolerates_conventions_but_not_swaps() -> None:
    stats = (
        _stats(1, share_muscle_hu=0.95),
        _stats(2, pixels=100, share_subcutaneous_fat_hu=1.0, touching={1: 0.9}),
        _stats(5, share_subcutaneous_fat_hu=1.0),
        _stats(7, share_subcutaneous_fat_hu=1.0, share_under_skin=0.25),
    )
    proposal = propose_mapping(stats)
    right = LabelMap(muscle=[1], subcutaneous_fat=[7], visceral_fat=[5], background=[2])
    imat_as_muscle = LabelMap(muscle=[1, 2], subcutaneous_fat=[7], visceral_fat=[5])
    assert mapping_verdict(right, proposal).fits and not mapping_verdict(right, proposal).problems
    assert mapping_verdict(imat_as_muscle, proposal).fits  # a convention, not a mistake
    for wrong in (
        LabelMap(muscle=[7], subcutaneous_fat=[1], visceral_fat=[5], background=[2]),
        LabelMap(muscle=[1], subcutaneous_fat=[5], visceral_fat=[7], background=[2]),
        LabelMap(muscle=[1], subcutaneous_fat=[7], visceral_fat=[2], background=[5]),
    ):
        verdict = mapping_verdict(wrong, proposal)
        assert not verdict.fits and verdict.problems
        assert tomllib.loads(verdict.toml)["labels"] == {
            "muscle": [1],
            "subcutaneous_fat": [7],
            "visceral_fat": [5],
            "background": [2],
        }


@pytest.mark.parametrize("profile", SITE_PROFILES, ids=lambda p: p.name)
def test_every_demo_hospital_passes_with_its_own_mapping(tmp_path: Path, profile: SiteProfile) -> None:
    """No false alarm on any demo convention (psoas or paraspinals left out, IMAT in muscle, tight
    contours, other values): the mapping fits and the proposal is the site's true mapping."""
    root = make_site(tmp_path / "site", profile, slices=3, size=64, seed=3)
    protocol = LabelProtocol(name="x", imat_in_muscle=True) if profile.convention.imat_as_muscle else None
    report = check_site(load_site(root), protocol=protocol)
    assert report.mapping is not None and report.mapping.fits and not report.mapping.problems
    assert report.usable
    assert report.mapping.proposal.labels == _truth(profile)
    muscle = next(v for v in report.mask_values if v.value == profile.values.muscle)
    assert muscle.share_around_spine is not None and muscle.share_around_spine > 0.1
    assert report.mapping.proposal.slice_o_matic == (profile.values.imat == 2 and profile.values.muscle == 1)


@pytest.mark.parametrize(
    ("index", "a", "b"),
    [
        (0, "muscle", "subcutaneous_fat"),
        (5, "muscle", "subcutaneous_fat"),
        (1, "subcutaneous_fat", "visceral_fat"),
    ],
)
def test_site_check_fails_a_swapped_mapping_with_the_right_proposal(
    tmp_path: Path, index: int, a: str, b: str
) -> None:
    profile = SITE_PROFILES[index]
    root = make_site(tmp_path / "site", profile, slices=3, size=64, seed=1)
    assert runner.invoke(app, ["site", "check", str(root)]).exit_code == 0
    _swap(root, a, b)
    result = runner.invoke(app, ["site", "check", str(root), "--json"])
    assert result.exit_code == 1
    mapping = json.loads(result.stdout)["mapping"]
    assert mapping["fits"] is False
    truth = _truth(profile)
    assert tomllib.loads(mapping["toml"])["labels"] == truth.model_dump(exclude_defaults=True)
    assert any(f"declared {a}" in p for p in mapping["problems"])
    shown = runner.invoke(app, ["site", "check", str(root)], env={"COLUMNS": "200"})
    assert shown.exit_code == 1
    assert f"muscle = [{truth.muscle[0]}]" in shown.stdout and "does not fit" in shown.stdout
    # the label audit reads labels through [labels]: through the wrong one it would name
    # made-up conventions, so it is not shown
    assert "Label audit skipped" in shown.stdout and "labelling convention of this site" not in shown.stdout
