"""Model or labels? Each finding attributed by evidence, not by a majority of sites.

A finding compares a site's labels with the model's (protocol-applied) prediction. Whose
difference it is follows from two kinds of evidence that need no other site:

1. the site's **label audit** (``common.label_audit``): the site's labels checked against the
   study's label protocol on its own images, without any model. If the audit shows the same
   deviation consistently, the finding is the site's convention. If the audit checked that
   kind of deviation and the labels follow the protocol there, the difference is the model's.
   Where the protocol itself labels the way the site does (e.g. the site leaves intramuscular
   fat out of muscle and so does the protocol), the difference is the model's as well;
2. the model's **error profile** (:class:`protocols.findings.ErrorProfile`): its findings
   against protocol-following labels on the internal test split. Where the audit cannot
   check a kind of deviation, a finding that is no more frequent at this site than in the
   profile (one-sided Fisher exact test, ``P_EXCEEDS``) is the model's; one that is clearly
   more frequent, or one with no profile to compare with, stays ``undetermined``.

Every attribution carries its evidence in words. Works with a single external site.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Final

from common.discrepancy.findings import is_systematic
from common.discrepancy.slice import Key
from common.pooling import error_profile
from common.stats import proportion_greater_p
from protocols.findings import AuditCheck, ErrorProfile, Finding, KeyStats, LabelAudit
from protocols.payloads import EvaluationPayload
from protocols.protocol import LabelProtocol

#: A site's rate of a finding "clearly exceeds" the model's profile below this one-sided p-value.
P_EXCEEDS: Final = 0.01

_GROUP_REGIONS: Final = ("psoas", "paraspinal")
_FAT_DENSITY_REGIONS: Final = ("boundary", "other")


def _key(item: Finding | AuditCheck) -> Key:
    return Key(item.tissue, item.direction, item.region)


def covering_checks(key: Key, audit: LabelAudit | None) -> list[AuditCheck]:
    """The audit checks that speak to a finding of kind ``key``.

    The same kind; for the fat classes, labels outside the class's HU range also explain a
    ``site_includes`` band or region (the site's fat reaches where the protocol's stops).
    """
    if audit is None:
        return []
    out = [c for c in audit.checks if _key(c) == key]
    if key.tissue != "muscle" and key.direction == "site_includes" and key.region in _FAT_DENSITY_REGIONS:
        out += [
            c for c in audit.checks if _key(c) == Key(key.tissue, "site_includes", "other") and c not in out
        ]
    return out


def protocol_agrees_with_site(key: Key, protocol: LabelProtocol) -> str | None:
    """Why the protocol itself labels as the site does for this kind (None when it does not)."""
    if key.tissue != "muscle":
        return None
    if key.region == "intramuscular_fat":
        if key.direction == "site_excludes" and not protocol.imat_in_muscle:
            return f"the {protocol.name} protocol leaves intramuscular fat out of muscle, as this site does"
        if key.direction == "site_includes" and protocol.imat_in_muscle:
            return f"the {protocol.name} protocol counts intramuscular fat as muscle, as this site does"
    if key.region in _GROUP_REGIONS:
        counted = protocol.includes(key.region)
        if key.direction == "site_includes" and counted:
            return (
                f"the {protocol.name} protocol counts the {key.region} muscles as muscle, as this site does"
            )
        if key.direction == "site_excludes" and not counted:
            return f"the {protocol.name} protocol leaves the {key.region} muscles out, as this site does"
    return None


def _profile_text(stats: KeyStats | None, finding: Finding) -> tuple[str, float | None]:
    """How the finding compares with the model's profile, and the one-sided p-value."""
    if stats is None or stats.n == 0:
        return "not seen on the internal test slices", None
    n_site = finding.n_slices
    k_site = finding.n_present if finding.n_present is not None else round(finding.prevalence * n_site)
    p = proportion_greater_p(k_site, n_site, stats.n_present, stats.n)
    return (
        f"on the internal test slices the model shows it on {stats.n_present} of {stats.n}, here on "
        f"{k_site} of {n_site} (one-sided Fisher p = {p:.2g})",
        p,
    )


def attribute(
    finding: Finding,
    *,
    audit: LabelAudit | None,
    profile: ErrorProfile | None,
    protocol: LabelProtocol,
) -> Finding:
    """The finding with ``attribution`` and ``evidence`` set (see the module docstring)."""
    key = _key(finding)
    checks = covering_checks(key, audit)
    stats = profile.key_stats.get(key.text()) if profile is not None else None
    compared, p = (
        _profile_text(stats, finding) if profile is not None else ("no error profile of the model", None)
    )
    convention = [c for c in checks if c.systematic]
    if convention:
        return _set(
            finding, "site_convention", f"label audit: {convention[0].sentence} Model profile: {compared}."
        )
    agrees = protocol_agrees_with_site(key, protocol)
    if agrees:
        return _set(
            finding, "model", f"{agrees}, so the difference is the model's. Model profile: {compared}."
        )
    conform = [c for c in checks if c.conforms]
    if conform:
        check = conform[0]
        return _set(
            finding,
            "model",
            f"the label audit finds this site's labels following the protocol here ({check.n_present} of "
            f"{check.n_slices} slices deviate), so the difference is the model's. Model profile: {compared}.",
        )
    if stats is not None and p is not None and stats.n_present > 0 and p >= P_EXCEEDS:
        return _set(finding, "model", f"no more frequent than the model's own error: {compared}.")
    why = "the label audit cannot check this kind of difference"
    if p is not None and p < P_EXCEEDS:
        return _set(
            finding, "undetermined", f"more frequent than the model's own error ({compared}), but {why}."
        )
    return _set(finding, "undetermined", f"{why}, and {compared}.")


def _set(finding: Finding, attribution: str, evidence: str) -> Finding:
    return finding.model_copy(update={"attribution": attribution, "evidence": evidence})


def attribute_all(
    findings: Iterable[Finding],
    *,
    audit: LabelAudit | None,
    profile: ErrorProfile | None,
    protocol: LabelProtocol,
) -> list[Finding]:
    """:func:`attribute` for each finding, order kept."""
    return [attribute(f, audit=audit, profile=profile, protocol=protocol) for f in findings]


def systematic_in_profile(profile: ErrorProfile) -> list[str]:
    """The kinds the model gets wrong consistently on protocol-following labels."""
    return sorted(k for k, s in profile.key_stats.items() if is_systematic(s.n_present, s.n))


__all__ = [
    "P_EXCEEDS",
    "attribute",
    "attribute_all",
    "covering_checks",
    "protocol_agrees_with_site",
    "study_attribution",
    "systematic_in_profile",
]


def study_attribution(
    payloads: Mapping[str, EvaluationPayload], protocol: LabelProtocol
) -> tuple[ErrorProfile | None, dict[str, list[Finding]]]:
    """The coordinator's view: the model's error profile and every site's attributed findings.

    The profile pools the internal sites' test-split statistics (their labels follow the
    protocol there, as their label audits show); each site's findings are then attributed
    with its own label audit and that profile. Internal sites are attributed too: their
    systematic findings are, by construction, the model's profile.
    """
    internal = {
        site: (p.discrepancy.n_slices, p.discrepancy.key_stats)
        for site, p in payloads.items()
        if p.role == "internal" and p.discrepancy is not None and p.discrepancy.n_slices
    }
    profile = None
    if internal:
        n_slices = sum(n for n, _ in internal.values())
        profile = error_profile(
            internal,
            f"the model against protocol-following labels on the held-out test patients of "
            f"{len(internal)} internal site(s) ({n_slices} slices)",
        )
    findings = {
        site: attribute_all(
            p.discrepancy.findings if p.discrepancy else p.findings,
            audit=p.label_audit,
            profile=profile,
            protocol=protocol,
        )
        for site, p in payloads.items()
        if p.task == "evaluate"
    }
    return profile, findings
