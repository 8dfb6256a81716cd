"""common.pooling: cross-site pooling and the sites each pooled value is over."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from report_builders import BINS_A, BINS_B, RAW, payload, scores, study_report, suppressed_study, two_sites

from common.pooling import (
    limits_of_agreement,
    pool_by_role,
    pool_class_scores,
    pool_payloads,
    pool_report,
    pool_sarcopenia,
    usable_payloads,
    withheld_paths,
)
from protocols.classes import IOU_BINS
from protocols.payloads import AreaAgreement
from protocols.pooled import Coverage, PooledGroup, PooledReport

ROOT = Path(__file__).resolve().parents[1]


def test_the_pooling_module_loads_neither_pandas_nor_flower_nor_torch() -> None:
    heavy = "('pandas', 'flwr', 'torch', 'matplotlib')"
    code = f"import sys, common.pooling; print(sorted(m for m in {heavy} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout


# --------------------------------------------------------------------------- coverage


def test_coverage_in_words() -> None:
    assert Coverage.of(["a", "b", "c"], []).describe() == "complete: all 3 sites"
    assert Coverage.of(["a"], []).describe() == "complete: 1 site"
    partial = Coverage.of(["a", "b"], ["x"])
    assert partial.state == "incomplete" and not partial.complete
    assert partial.describe() == "incomplete: 1 of 3 sites suppressed (x)"
    assert Coverage.of([], ["x", "y"]).describe() == "incomplete: 2 of 2 sites suppressed (x, y)"


def test_a_coverage_state_must_match_its_suppressed_sites() -> None:
    with pytest.raises(ValueError, match="expected 'incomplete'"):
        Coverage(state="complete", sites=["a"], suppressed=["x"])


# --------------------------------------------------------------------------- one value


def test_suppressed_bins_add_nothing_and_all_suppressed_is_not_zero() -> None:
    a = scores((3, 1, 0, 0, 1), 0.9, 0.05, 90, 100)
    b = scores((2, 2, 1, 0, 0), 0.8, 0.05, 80, 100)
    hidden = b.model_copy(update={"bins": {}})
    pooled = pool_class_scores([a, hidden])
    assert pooled.bins == dict(zip(IOU_BINS, (3, 1, 0, 0), strict=True))
    assert (pooled.intersection_px, pooled.union_px, pooled.iou.n) == (170, 200, 9)  # pixels still add
    assert pool_class_scores([a, b]).bins == dict(zip(IOU_BINS, (5, 3, 1, 0), strict=True))
    assert pool_class_scores([hidden, hidden]).bins == {}  # not available, never 0


def test_limits_of_agreement() -> None:
    assert limits_of_agreement(1.0, 2.0) == pytest.approx((1.0 - 3.92, 1.0 + 3.92))
    assert limits_of_agreement(1.0, None) is None


def test_sarcopenia_counts_add_and_mixed_cut_offs_refuse() -> None:
    pooled = pool_payloads(two_sites())
    assert pooled.sarcopenia is not None
    assert (pooled.sarcopenia.both_sarcopenic, pooled.sarcopenia.test_only) == (2 + 3, 0 + 1)
    korean = pooled.sarcopenia.model_copy(update={"cutoff_set": "korean"})
    with pytest.raises(ValueError, match="different cut-off sets"):
        pool_sarcopenia([pooled.sarcopenia, korean])


# --------------------------------------------------------------------------- the study


def test_only_ok_sites_with_slices_are_pooled() -> None:
    assert list(usable_payloads(study_report())) == ["hospital-a", "hospital-f", "hospital-b", "hospital-g"]
    internal, external = pool_report(study_report())
    assert (internal.role, internal.sites) == ("internal", ["hospital-a", "hospital-f"])
    assert (external.role, external.sites) == ("external", ["hospital-b", "hospital-g"])  # not hospital-d (0)
    no_site = study_report().model_copy(update={"sites": []})
    assert pool_report(no_site) == []


# --------------------------------------------------------------------------- internal vs external


def test_internal_and_external_are_pooled_separately_never_together() -> None:
    """pool_by_role: one pool per role, each the sum of its own sites only."""
    a = payload("a", 10, BINS_A, seed=0, shift=0.0, role="internal")
    b = payload("b", 8, BINS_B, seed=1, shift=0.0, role="external")
    c = payload("c", 10, BINS_A, seed=0, shift=1.0, role="internal")
    internal, external = pool_by_role({"b": b, "a": a, "c": c})  # internal first, whatever the order
    assert (internal.role, internal.sites, internal.n_used, internal.n_groups) == (
        "internal",
        ["a", "c"],
        20,
        18,
    )
    assert (external.role, external.sites, external.n_used) == ("external", ["b"], 8)
    assert internal.scores["muscle"].bins == {
        b_: 2 * n for b_, n in zip(IOU_BINS, BINS_A["muscle"], strict=False)
    }
    assert external.scores["muscle"].bins == dict(zip(IOU_BINS, BINS_B["muscle"], strict=False))
    assert external.areas["muscle"].n == 8  # nothing of a or c
    roleless = payload("x", 8, BINS_A, seed=0, shift=0.0)
    assert [p.role for p in pool_by_role({"x": roleless, "b": b})] == ["external", None]


def test_pooling_payloads_of_different_roles_together_is_refused() -> None:
    a = payload("a", 10, BINS_A, seed=0, shift=0.0, role="internal")
    b = payload("b", 8, BINS_B, seed=1, shift=0.0, role="external")
    with pytest.raises(ValueError, match=r"never together; got \{'internal': \['a'\], 'external': \['b'\]\}"):
        pool_payloads({"a": a, "b": b})


def test_a_pooled_report_refuses_a_site_in_two_groups_and_a_role_twice() -> None:
    a = payload("a", 10, BINS_A, seed=0, shift=0.0, role="internal")
    b = payload("b", 8, BINS_B, seed=1, shift=0.0, role="external")
    internal = PooledGroup.of(pool_payloads({"a": a}), {})
    external = PooledGroup.of(pool_payloads({"b": b}), {})
    assert PooledReport(groups=[internal, external]).group("external") == external
    with pytest.raises(ValueError, match="one pooled group per role"):
        PooledReport(groups=[internal, internal])
    renamed = pool_payloads({"a": b.model_copy(update={"site": "a"})})  # site "a" again, as external
    with pytest.raises(ValueError, match="site 'a' is pooled as 'internal' and as 'external'"):
        PooledReport(groups=[internal, PooledGroup.of(renamed, {})])
    with pytest.raises(ValueError, match="differs from its results"):
        PooledGroup(role="external", n_sites=1, n_slices=10, n_patients=9, results=internal.results)


def test_raw_scores_pool_over_the_sites_that_sent_them() -> None:
    a = payload("hospital-a", 10, BINS_A, seed=0, shift=0.0, role="external")
    b = payload("hospital-b", 8, BINS_B, seed=1, shift=0.0, role="external")
    pooled = pool_payloads({"hospital-a": a, "hospital-b": b})
    raw_top = RAW["hospital-a"]["muscle"][0] + RAW["hospital-b"]["muscle"][0]
    assert pooled.raw_scores is not None and pooled.raw_scores["muscle"].bins["[0.9,1.0]"] == raw_top
    assert pooled.scores["muscle"].bins["[0.9,1.0]"] == BINS_A["muscle"][0] + BINS_B["muscle"][0]
    silent = pool_payloads({"hospital-a": a, "hospital-b": b.model_copy(update={"raw_scores": None})})
    assert silent.raw_scores is not None
    assert silent.raw_scores["muscle"].bins["[0.9,1.0]"] == RAW["hospital-a"]["muscle"][0]
    assert silent.coverage("raw_scores.muscle.bins").suppressed == ["hospital-b"]
    assert silent.coverage("scores.muscle.bins").complete


def test_withheld_paths_are_the_policy_marks_and_what_is_missing() -> None:
    p = payload("x", 8, BINS_A, seed=0, shift=0.0)
    # this builder's sites send no harmonised scores, and without a role no raw scores either
    assert withheld_paths(p) == {"harmonised_scores", "raw_scores"}
    assert withheld_paths(p.model_copy(update={"task": "compare"})) == {"harmonised_scores"}  # no model
    hidden = p.model_copy(
        update={
            "scores": {**p.scores, "msv": p.scores["msv"].model_copy(update={"bins": {}})},
            "areas": {k: v for k, v in p.areas.items() if k != "visceral_fat"},
            "smi": None,
            "suppressed": ["areas.muscle", "discrepancy.polar", "findings"],
        }
    )
    assert withheld_paths(hidden) == {
        "harmonised_scores",
        "raw_scores",
        "scores.msv.bins",
        "areas.visceral_fat",
        "areas.muscle",
        "smi",
    }


def test_a_site_that_suppressed_its_bins_makes_the_pooled_bins_incomplete() -> None:
    """The defect of issue 11: hospital-c's bins are suppressed, its pixels are not. It is external:
    its group is incomplete, the internal group is not touched."""
    internal, pooled = pool_report(suppressed_study())
    assert internal.coverage("scores.muscle.bins").complete and "hospital-c" not in internal.sites
    assert pooled.role == "external" and pooled.sites == ["hospital-b", "hospital-g", "hospital-c"]
    muscle = pooled.scores["muscle"]
    assert muscle.bins["[0.9,1.0]"] == 2 + 1  # hospital-b and -g only
    assert muscle.union_px == 1000 * (8 + 6 + 10)  # all three
    bins = pooled.coverage("scores.muscle.bins")
    assert (bins.state, bins.sites, bins.suppressed) == (
        "incomplete",
        ["hospital-b", "hospital-g"],
        ["hospital-c"],
    )
    assert bins.describe() == "incomplete: 1 of 3 sites suppressed (hospital-c)"
    assert pooled.coverage("scores.msv.bins").complete  # its MSV bins had no small cell
    assert pooled.coverage("scores.muscle.union_px").complete
    assert not pooled.coverage("scores.muscle").complete  # a path covers what is withheld below it
    assert pooled.coverage("areas.muscle").complete
    assert pooled.sarcopenia is not None and not pooled.coverage("sarcopenia").complete


def test_a_missing_class_leaves_the_site_out_of_everything_below_it() -> None:
    a = payload("a", 8, BINS_A, seed=0, shift=0.0)
    b = a.model_copy(update={"site": "b", "scores": {k: v for k, v in a.scores.items() if k != "msv"}})
    pooled = pool_payloads({"a": a, "b": b})
    assert pooled.withheld["scores.msv"] == ["b"]
    assert pooled.coverage("scores.msv.iou").suppressed == ["b"]
    assert pooled.scores["msv"].iou.n == a.scores["msv"].iou.n


def test_area_of_a_suppressed_site_is_not_pooled_as_slices() -> None:
    a = payload("a", 8, BINS_A, seed=0, shift=0.0)
    b = payload("b", 10, BINS_A, seed=1, shift=1.0)
    b = b.model_copy(
        update={"areas": {**b.areas, "muscle": AreaAgreement(n=0)}, "suppressed": ["areas.muscle"]}
    )
    pooled = pool_payloads({"a": a, "b": b})
    muscle = pooled.areas["muscle"]
    assert muscle.n == 8
    assert muscle.mean_diff_cm2 == pytest.approx(a.areas["muscle"].mean_diff_cm2)
    assert muscle.sd_diff_cm2 == pytest.approx(a.areas["muscle"].sd_diff_cm2)
    assert pooled.coverage("areas.muscle").describe() == "incomplete: 1 of 2 sites suppressed (b)"
    assert pooled.coverage("areas.subcutaneous_fat").complete


def test_a_withheld_spread_makes_the_pooled_spread_unavailable_not_zero() -> None:
    """A differentially private reply sends sums but no sum of squares: pooled means stay exact,
    the pooled sd and limits of agreement become unavailable (never computed from a 0)."""
    from common.pooling import pool_area_agreement, pool_distributions
    from protocols.payloads import AreaAgreement, Distribution

    exact = AreaAgreement(n=4, mean_diff_cm2=1.0, sd_diff_cm2=2.0, sum_diff_cm2=4.0, sum_sq_diff_cm2=16.0)
    private = AreaAgreement(n=6, mean_diff_cm2=-1.0, sum_diff_cm2=-6.0, sum_sq_diff_cm2=None)
    pooled = pool_area_agreement([exact, private])
    assert pooled.mean_diff_cm2 == pytest.approx(-0.2) and pooled.sd_diff_cm2 is None
    assert pooled.sum_sq_diff_cm2 is None
    mean_only = pool_distributions([Distribution(n=3, mean=0.5, sd=0.1), Distribution(n=2, mean=0.0)])
    assert mean_only.mean == pytest.approx(0.3) and mean_only.sd is None
