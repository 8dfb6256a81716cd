"""The diagnostic impact of a finding agrees with the site's own SMI agreement and calls."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.dataset import load_site
from common.demo.hospitals import make_site, site_profile
from common.site_evaluation import compare_with_reference


@pytest.mark.parametrize("profile", [1, 3])  # psoas left out; paraspinals left out
def test_the_finding_explains_most_of_the_smi_shift_and_no_more_calls_than_changed(
    tmp_path: Path, profile: int
) -> None:
    site = make_site(tmp_path / "site", site_profile(profile), slices=10, size=128, seed=5)
    payload = compare_with_reference(load_site(site)).payload
    systematic = [f for f in payload.findings if f.systematic]
    assert len(systematic) == 1
    finding = systematic[0]
    smi, calls = payload.smi, payload.sarcopenia
    assert smi is not None and calls is not None and finding.calls_known == smi.n
    # One convention difference: undoing its region is most of what the reference masks do
    # (a few of its pixels are named boundary/other), and never more.
    assert smi.mean_diff is not None and smi.mean_diff > 0
    assert 0.7 * smi.mean_diff <= finding.smi_shift_mean <= smi.mean_diff + 0.05
    # the size comes with its interval (over the slices with a height)
    assert finding.smi_shift_low is not None and finding.smi_shift_high is not None
    assert finding.smi_shift_low < finding.smi_shift_mean < finding.smi_shift_high
    # Adding back part of the left-out muscle cannot flip a call that adding all of it keeps.
    assert finding.calls_changed is not None
    assert finding.calls_changed <= calls.label_only + calls.test_only


def test_fat_findings_carry_no_smi_impact(tmp_path: Path) -> None:
    site = make_site(tmp_path / "site", site_profile(2), slices=8, size=128, seed=5)  # IMAT as muscle
    payload = compare_with_reference(load_site(site)).payload
    assert any(f.region == "intramuscular_fat" for f in payload.findings)
    for f in payload.findings:
        if f.tissue != "muscle":
            assert f.smi_shift_mean is None and f.calls_changed is None
        else:
            assert f.calls_known is not None
