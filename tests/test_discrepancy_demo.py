"""On the synthetic demo hospitals, each planted label convention is found and named.

The site's labels are compared with the manifest's ``reference`` masks (Alberta convention)
read through the site-dataset loader, as ``sarcofed site compare`` does: no model needed.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from common.dataset import iter_slices, load_site
from common.demo.hospitals import SITE_PROFILES, SiteProfile, make_site
from common.discrepancy import DiscrepancyAccumulator, analyse_slice

SLICES = 6
SIZE = 160
PROFILES = {p.key: p for p in SITE_PROFILES}


def _summary(root: Path, profile: SiteProfile, seed: int = 0):
    make_site(root, profile, slices=SLICES, size=SIZE, seed=seed)
    acc = DiscrepancyAccumulator()
    for item in iter_slices(load_site(root), with_reference=True):
        assert not isinstance(item, Exception), item
        acc.add(analyse_slice(item.ct.hu, item.ct.spacing_mm, item.label, item.reference))
    summary = acc.finalise(min_slices=SLICES)
    assert summary.n_slices == SLICES and summary.n_no_spine == 0
    return summary


def _systematic(summary) -> set[tuple[str, str, str]]:
    return {(f.tissue, f.direction, f.region) for f in summary.findings if f.systematic}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("reference-like", set()),
        ("reference-like, noisy scanner", set()),
        ("psoas left out", {("muscle", "site_excludes", "psoas")}),
        ("paraspinals left out", {("muscle", "site_excludes", "paraspinal")}),
        ("contours drawn 2 px tight", {("muscle", "site_excludes", "boundary")}),
    ],
)
def test_each_planted_convention_is_the_only_systematic_finding(
    tmp_path: Path, key: str, expected: set
) -> None:
    summary = _summary(tmp_path / "site", PROFILES[key])
    assert _systematic(summary) == expected
    for f in summary.findings:
        if f.systematic and f.region != "boundary":
            assert f.density_consistency > 0.9  # real muscle left out: muscle density


@pytest.mark.slow
def test_imat_counted_as_muscle_is_named_intramuscular_fat(tmp_path: Path) -> None:
    summary = _summary(tmp_path / "site", PROFILES["IMAT included in muscle"])
    found = _systematic(summary)
    assert ("muscle", "site_includes", "intramuscular_fat") in found
    assert not any(direction == "site_excludes" for _, direction, _ in found)
    imat = next(f for f in summary.findings if f.region == "intramuscular_fat")
    assert imat.density_consistency < 0.3  # it is fat, not muscle
    assert "includes intramuscular fat" in imat.sentence


@pytest.mark.slow
def test_scanner_noise_blur_and_pixel_spacing_create_no_finding(tmp_path: Path) -> None:
    base = PROFILES["reference-like"]
    for i, scanner in enumerate(
        [
            replace(base.scanner, noise_sd=35.0, blur_mm=1.6),
            replace(base.scanner, fov_mm=(300.0, 320.0), noise_sd=5.0, blur_mm=0.3),
        ]
    ):
        summary = _summary(tmp_path / f"site-{i}", replace(base, scanner=scanner), seed=3)
        assert _systematic(summary) == set()
    psoas = PROFILES["psoas left out"]
    noisy = replace(psoas, scanner=replace(psoas.scanner, noise_sd=35.0, fov_mm=(440.0, 460.0)))
    summary = _summary(tmp_path / "psoas-noisy", noisy, seed=3)
    assert _systematic(summary) == {("muscle", "site_excludes", "psoas")}
