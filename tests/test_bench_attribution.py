"""bench/bench_attribution.py's pure parts: the IoU >= 0.9 share and the precision / recall count."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from report_builders import BINS_A, BINS_B, payload

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bench_attribution import EXPECTED, SiteOutcome, _share_ge_09, audit_only, score

from protocols.classes import IOU_BINS


def test_the_ge_09_share_reads_the_payloads_own_bin_keys() -> None:
    """BINS_A puts 8 of 10 muscle slices in [0.9,1.0], BINS_B 2 of 8 (the keys IOU_BINS names)."""
    a, b = payload("a", 10, BINS_A, seed=0, shift=0.0), payload("b", 8, BINS_B, seed=1, shift=0.0)
    assert a.scores["muscle"].bins[IOU_BINS[0]] == 8
    assert _share_ge_09(a) == pytest.approx(0.8)
    assert _share_ge_09(a, b) == pytest.approx(10 / 18)  # bins add over sites
    suppressed = a.model_copy(
        update={"scores": {**a.scores, "muscle": a.scores["muscle"].model_copy(update={"bins": {}})}}
    )
    assert _share_ge_09(suppressed) is None


def _site(name: str, convention: str, audit: tuple[str, ...] = (), **systematic: str) -> SiteOutcome:
    return SiteOutcome(
        site=name,
        convention=convention,
        role="external",
        n_used=24,
        muscle_ge_09=None,
        systematic={k.replace("__", ":"): v for k, v in systematic.items()},
        audit=list(audit),
    )


def test_precision_counts_every_site_convention_claim_and_recall_the_primary_findings() -> None:
    psoas, imat = "psoas left out", "IMAT included in muscle"
    assert EXPECTED[psoas][0] == "muscle:site_excludes:psoas"
    sites = [
        _site("p", psoas, muscle__site_excludes__psoas="site_convention"),
        # a secondary implied finding counts as correct; the primary one is missed
        _site("i", imat, muscle__site_includes__boundary="site_convention"),
        # a reference hospital with a site_convention claim: a false positive; "model" claims do not count
        _site("r", "reference-like", muscle__site_excludes__boundary="site_convention", other="model"),
    ]
    precision, recall, tp, false_positive, missed = score(sites)
    assert (tp, false_positive, missed) == (
        2,
        ["r: muscle:site_excludes:boundary"],
        [f"i: {EXPECTED[imat][0]}"],
    )
    assert precision == pytest.approx(2 / 3) and recall == pytest.approx(1 / 2)
    assert score([_site("r", "reference-like", k="model")])[:2] == (None, 0.0)


def test_a_convention_only_the_label_audit_names_counts_and_one_called_the_models_is_missed() -> None:
    """The report names a convention in its label-audit section too: a tight-contour site whose
    boundary difference a model error cancels is still found. A primary finding attributed to the
    model is missed even when the audit names it (the report would contradict itself)."""
    tight, psoas = "contours drawn 2 px tight", "psoas left out"
    boundary, psoas_key = EXPECTED[tight][0], EXPECTED[psoas][0]
    sites = [
        _site("t", tight, audit=(boundary,)),
        _site("p", psoas, audit=(psoas_key,), muscle__site_excludes__psoas="model"),
        # named in both places: counted once
        _site("p2", psoas, audit=(psoas_key,), muscle__site_excludes__psoas="site_convention"),
        # an audit claim at a reference hospital is a false positive
        _site("r", "reference-like", audit=("muscle:site_excludes:psoas",)),
    ]
    precision, recall, tp, false_positive, missed = score(sites)
    assert tp == 3 and false_positive == ["r: muscle:site_excludes:psoas"]
    assert missed == [f"p: {psoas_key} (attributed model)"]
    assert recall == pytest.approx(2 / 3) and precision == pytest.approx(3 / 4)
    assert audit_only(sites) == [f"t: {boundary}"]
