"""Model or labels, decided per finding from the site's label audit and the model's error profile."""

from __future__ import annotations

import pytest
from report_builders import BINS_A, payload

from common.attribution import attribute, study_attribution, systematic_in_profile
from common.discrepancy.findings import SUPPRESSED_KEYS
from common.label_audit import audit_sentence
from common.pooling import error_profile, pool_key_stats
from protocols.findings import AuditCheck, Finding, KeyStats, LabelAudit
from protocols.payloads import DiscrepancySummary, EvaluationPayload
from protocols.protocol import ALBERTA, LabelProtocol


def _finding(tissue: str, direction: str, region: str, k: int = 12, n: int = 12) -> Finding:
    return Finding(
        tissue=tissue,  # type: ignore[arg-type]
        direction=direction,  # type: ignore[arg-type]
        region=region,  # type: ignore[arg-type]
        prevalence=k / n,
        mean_area_share=0.05,
        mean_area_cm2=3.0,
        density_consistency=0.9,
        systematic=k == n,
        n_slices=n,
        n_present=k,
        sentence="",
    )


def _check(tissue: str, direction: str, region: str, k: int, n: int = 12) -> AuditCheck:
    check = AuditCheck(
        tissue=tissue,  # type: ignore[arg-type]
        direction=direction,  # type: ignore[arg-type]
        region=region,  # type: ignore[arg-type]
        n_slices=n,
        n_present=k,
        prevalence=k / n,
        prevalence_low=0.8 if k == n else 0.0,
        prevalence_high=1.0 if k else 0.25,
        systematic=k == n,
        conforms=k == 0,
        mean_area_cm2=2.0,
        mean_area_share=0.02,
        sentence="",
    )
    return check.model_copy(update={"sentence": audit_sentence(check, ALBERTA)})


def _audit(*checks: AuditCheck) -> LabelAudit:
    return LabelAudit(protocol="alberta", n_slices=12, checks=list(checks))


def _stats(k: int, n: int) -> KeyStats:
    return KeyStats(
        n=n, n_present=k, sum_net_share=0.1, sum_sq_net_share=0.01, sum_net_cm2=1, sum_sq_net_cm2=1
    )


def _profile(key: str, k: int, n: int = 24):
    return error_profile({"site-a": (n, {key: _stats(k, n)})}, "internal test split")


def test_the_audit_showing_the_same_deviation_makes_it_the_sites_convention() -> None:
    f = attribute(
        _finding("muscle", "site_excludes", "psoas"),
        audit=_audit(_check("muscle", "site_excludes", "psoas", 12)),
        profile=None,
        protocol=ALBERTA,
    )
    assert f.attribution == "site_convention"
    assert f.evidence is not None and "psoas" in f.evidence and "label audit" in f.evidence


def test_labels_that_follow_the_protocol_make_the_difference_the_models() -> None:
    """Works with one external site and no profile: the audit alone says the labels conform."""
    f = attribute(
        _finding("muscle", "site_includes", "boundary"),
        audit=_audit(_check("muscle", "site_includes", "boundary", 0)),
        profile=None,
        protocol=ALBERTA,
    )
    assert f.attribution == "model" and "following the protocol" in (f.evidence or "")


def test_fat_outside_its_hu_range_explains_a_fat_band() -> None:
    audit = _audit(_check("visceral_fat", "site_includes", "other", 12))
    f = attribute(
        _finding("visceral_fat", "site_includes", "boundary"),
        audit=audit,
        profile=_profile("visceral_fat:site_includes:boundary", 20),
        protocol=ALBERTA,
    )
    assert f.attribution == "site_convention" and "20 of 24" in (f.evidence or "")


def test_where_the_protocol_labels_like_the_site_the_model_differs() -> None:
    f = attribute(
        _finding("muscle", "site_excludes", "intramuscular_fat"), audit=None, profile=None, protocol=ALBERTA
    )
    assert f.attribution == "model"
    imat_protocol = LabelProtocol(name="imat-in", imat_in_muscle=True)
    g = attribute(
        _finding("muscle", "site_excludes", "intramuscular_fat"),
        audit=None,
        profile=None,
        protocol=imat_protocol,
    )
    assert g.attribution == "undetermined"


@pytest.mark.parametrize(("site_k", "expected"), [(12, "model"), (3, "model")])
def test_unchecked_kinds_as_frequent_as_in_the_profile_are_the_models(site_k: int, expected: str) -> None:
    key = "muscle:site_includes:abdominal_wall"
    f = attribute(
        _finding("muscle", "site_includes", "abdominal_wall", k=site_k),
        audit=_audit(),
        profile=_profile(key, 22),
        protocol=ALBERTA,
    )
    assert f.attribution == expected and "Fisher" in (f.evidence or "")


def test_unchecked_kinds_far_above_the_profile_or_without_one_stay_undetermined() -> None:
    key = "muscle:site_excludes:abdominal_wall"
    above = attribute(
        _finding("muscle", "site_excludes", "abdominal_wall"),
        audit=_audit(),
        profile=_profile(key, 1),
        protocol=ALBERTA,
    )
    assert above.attribution == "undetermined" and "more frequent" in (above.evidence or "")
    alone = attribute(
        _finding("muscle", "site_excludes", "abdominal_wall"), audit=None, profile=None, protocol=ALBERTA
    )
    assert alone.attribution == "undetermined"


def test_profiles_pool_exactly_and_name_the_models_systematic_errors() -> None:
    a = {
        "k": KeyStats(
            n=10, n_present=9, sum_net_share=1.0, sum_sq_net_share=0.2, sum_net_cm2=5, sum_sq_net_cm2=3
        )
    }
    b = {
        "k": KeyStats(
            n=5, n_present=5, sum_net_share=0.5, sum_sq_net_share=0.1, sum_net_cm2=2, sum_sq_net_cm2=1
        )
    }
    pooled = pool_key_stats([a, b])["k"]
    assert (pooled.n, pooled.n_present, pooled.sum_net_cm2) == (15, 14, 7)
    profile = error_profile({"a": (10, a), "b": (5, b)}, "test")
    assert profile.n_sites == 2 and profile.n_slices == 15
    assert systematic_in_profile(profile) == ["k"]


def test_a_site_rate_whose_interval_lies_above_the_profiles_is_not_called_the_models() -> None:
    """At small n Fisher's test has little power: 5 of 5 slices against 1 of 6 in the profile is
    not significant (p = 0.013), but the site's rate is clearly above the profile's (Wilson 95%
    intervals apart), so the model is not blamed: undetermined, and the evidence says why."""
    key = "muscle:site_includes:abdominal_wall"
    f = attribute(
        _finding("muscle", "site_includes", "abdominal_wall", k=5, n=5),
        audit=_audit(),
        profile=_profile(key, 1, n=6),
        protocol=ALBERTA,
    )
    assert f.attribution == "undetermined"
    assert "not significantly more frequent (one-sided Fisher p = 0.013)" in (f.evidence or "")
    assert "interval" in (f.evidence or "")
    close = attribute(
        _finding("muscle", "site_includes", "abdominal_wall", k=4, n=6),
        audit=_audit(),
        profile=_profile(key, 2, n=6),
        protocol=ALBERTA,
    )
    assert close.attribution == "model"
    assert "not significantly more frequent (one-sided Fisher p = " in (close.evidence or "")


def _internal(site: str, summary: DiscrepancySummary | None, suppressed: list[str]) -> EvaluationPayload:
    return payload(site, 10, BINS_A, seed=0, shift=0.0, role="internal").model_copy(
        update={"discrepancy": summary, "suppressed": suppressed}
    )


def test_the_profile_leaves_out_and_names_internal_sites_that_withheld_their_statistics() -> None:
    """An internal site below the discrepancy minimum (no key stats), one whose policy dropped a
    kind's stats and one that sent no discrepancy at all: none is pooled as if it had seen nothing,
    and the evidence names them."""
    seen, dropped = "muscle:site_includes:abdominal_wall", "muscle:site_excludes:abdominal_wall"
    payloads = {
        "a": _internal(
            "a", DiscrepancySummary(n_slices=24, findings=[], key_stats={seen: _stats(20, 24)}), []
        ),
        "b": _internal(
            "b", DiscrepancySummary(n_slices=3, findings=[], suppressed=list(SUPPRESSED_KEYS)), []
        ),
        "c": _internal(
            "c",
            DiscrepancySummary(n_slices=10, findings=[], key_stats={seen: _stats(8, 10)}),
            [f"discrepancy.key_stats.{dropped}"],
        ),
        "d": _internal("d", None, ["discrepancy"]),
        "x": payload("x", 12, BINS_A, seed=1, shift=0.0, role="external").model_copy(
            update={
                "discrepancy": DiscrepancySummary(
                    n_slices=12,
                    findings=[
                        _finding("muscle", "site_includes", "abdominal_wall"),
                        _finding("muscle", "site_excludes", "abdominal_wall"),
                    ],
                )
            }
        ),
    }
    profile, findings = study_attribution(payloads, ALBERTA)
    assert profile is not None
    assert (profile.n_sites, profile.n_slices) == (2, 34)
    assert profile.withheld == {"b": "too few slices", "d": "its release policy"}
    assert profile.withheld_keys == {dropped: ["c"]}
    assert "2 internal site(s)" in profile.source and "b, d" in profile.source
    evidence = {f.direction: f.evidence or "" for f in findings["x"]}
    assert "28 of 34" in evidence["site_includes"]
    assert "withheld by b (too few slices)" in evidence["site_includes"]
    assert "withheld by b, c (too few slices)" in evidence["site_excludes"]
    assert "withheld by d (its release policy)" in evidence["site_excludes"]
    assert "not seen on the internal test slices" not in evidence["site_excludes"]
    assert findings["x"][1].attribution == "undetermined"
