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
   check a kind of deviation, a finding is the model's when the model shows it in its
   profile, it is not significantly more frequent at this site (one-sided Fisher exact test,
   p >= ``P_EXCEEDS``) *and* this site's share of slices does not lie above the profile's (the
   site's 95% Wilson lower bound is at most the profile's upper bound: at small n the test
   alone has little power). Otherwise, or with no profile to compare with, it stays
   ``undetermined``. Internal sites that withheld their statistics are left out of the
   profile and named in the evidence.

Every attribution carries its evidence in words. Works with a single external site.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from common.discrepancy.findings import is_systematic
from common.discrepancy.slice import Key
from common.pooling import error_profile
from common.stats import proportion_greater_p, wilson_interval
from protocols.findings import AuditCheck, ErrorProfile, Finding, KeyStats, LabelAudit
from protocols.payloads import EvaluationPayload
from protocols.protocol import LabelProtocol

#: A site's rate of a finding "clearly exceeds" the model's profile below this one-sided p-value.
P_EXCEEDS: Final = 0.01
#: Why an internal site's statistics (or one kind's) are not in the profile, in the evidence's words.
WITHHELD_FEW_SLICES: Final = "too few slices"
#: The payload path of the discrepancy's key statistics (marked suppressed when withheld).
_KEY_STATS: Final = "discrepancy.key_stats"

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


def _withheld_note(profile: ErrorProfile, key: Key) -> str:
    """ "withheld by site-x (too few slices)": the internal sites this kind is not pooled over."""
    why_sites: dict[str, list[str]] = {}
    for site, why in profile.withheld.items():
        why_sites.setdefault(why, []).append(site)
    for site in profile.withheld_keys.get(key.text(), []):
        why_sites.setdefault(WITHHELD_FEW_SLICES, []).append(site)
    return "; ".join(f"withheld by {', '.join(sorted(sites))} ({why})" for why, sites in why_sites.items())


@dataclass(frozen=True)
class _Comparison:
    """A finding's share of slices here against the model's profile (``p`` None: nothing to compare)."""

    counts: str
    note: str = ""
    p: float | None = None
    k_site: int = 0
    n_site: int = 0

    def text(self) -> str:
        fisher = f" (one-sided Fisher p = {self.p:.2g})" if self.p is not None else ""
        return self.counts + fisher + (f"; {self.note}" if self.note else "")

    def counts_text(self) -> str:
        return self.counts + (f"; {self.note}" if self.note else "")


def _compare(profile: ErrorProfile | None, finding: Finding) -> tuple[KeyStats | None, _Comparison]:
    """The profile's statistics of the finding's kind, and how the finding compares with them."""
    if profile is None:
        return None, _Comparison("no error profile of the model")
    key = _key(finding)
    note = _withheld_note(profile, key)
    stats = profile.key_stats.get(key.text())
    if stats is None or stats.n == 0:
        counts = f"not in the model's profile ({note})" if note else "not seen on the internal test slices"
        return None, _Comparison(counts)
    n_site = finding.n_slices
    k_site = finding.n_present if finding.n_present is not None else round(finding.prevalence * n_site)
    return stats, _Comparison(
        f"on the internal test slices the model shows it on {stats.n_present} of {stats.n}, here on "
        f"{k_site} of {n_site}",
        note,
        proportion_greater_p(k_site, n_site, stats.n_present, stats.n),
        k_site,
        n_site,
    )


def _by_profile(finding: Finding, stats: KeyStats, compared: _Comparison, why: str) -> Finding:
    """Attribution of a kind the audit cannot speak to, when the profile shows it and the site's rate
    is not significantly higher: the model's unless the site's rate clearly lies above it."""
    site_low, site_high = wilson_interval(compared.k_site, compared.n_site)
    profile_low, profile_high = wilson_interval(stats.n_present, stats.n)
    head = (
        f"not significantly more frequent (one-sided Fisher p = {compared.p:.2g}) than the model's own "
        f"error ({compared.counts_text()})"
    )
    intervals = (
        f"95% Wilson intervals of the share of slices: here {site_low:.2f}-{site_high:.2f}, "
        f"in the profile {profile_low:.2f}-{profile_high:.2f}"
    )
    if site_low <= profile_high:
        return _set(
            finding, "model", f"{head}, and its share here does not lie above the model's ({intervals})."
        )
    return _set(
        finding,
        "undetermined",
        f"{head}, but its share here lies above the model's ({intervals}), and {why}.",
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
    stats, comparison = _compare(profile, finding)
    compared = comparison.text()
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
    why = "the label audit cannot check this kind of difference"
    p = comparison.p
    if stats is not None and p is not None and stats.n_present > 0 and p >= P_EXCEEDS:
        return _by_profile(finding, stats, comparison, why)
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


def _withheld(payload: EvaluationPayload) -> tuple[str | None, list[str]]:
    """Why none of an internal site's statistics can be pooled (None: they can), and the kinds it
    withheld one by one (its release policy drops a kind seen on too few slices)."""
    disc = payload.discrepancy
    if disc is None:
        return ("its release policy" if "discrepancy" in payload.suppressed else "not sent"), []
    if _KEY_STATS in disc.suppressed or disc.n_slices == 0:  # below the discrepancy minimum
        return WITHHELD_FEW_SLICES, []
    prefix = f"{_KEY_STATS}."
    return None, sorted(m.removeprefix(prefix) for m in payload.suppressed if m.startswith(prefix))


def study_attribution(
    payloads: Mapping[str, EvaluationPayload], protocol: LabelProtocol
) -> tuple[ErrorProfile | None, dict[str, list[Finding]]]:
    """The coordinator's view: the model's error profile and every site's attributed findings.

    The profile pools the internal sites' test-split statistics (their labels follow the
    protocol there, as their label audits show). An internal site that withheld them (too few
    slices, or its release policy) is left out and named in the profile, as is one that
    withheld a single kind: a comparison with the profile then says what it is not pooled
    over, never a silent partial pool. Each site's findings are then attributed with its own
    label audit and that profile. Internal sites are attributed too: their systematic
    findings are, by construction, the model's profile.
    """
    pooled: dict[str, tuple[int, dict[str, KeyStats]]] = {}
    withheld: dict[str, str] = {}
    withheld_keys: dict[str, list[str]] = {}
    for site, p in payloads.items():
        if p.role != "internal":
            continue
        why, keys = _withheld(p)
        if why is not None or p.discrepancy is None:
            withheld[site] = why or "not sent"
            continue
        pooled[site] = (p.discrepancy.n_slices, p.discrepancy.key_stats)
        for key in keys:
            withheld_keys.setdefault(key, []).append(site)
    profile = None
    if pooled or withheld:
        n_slices = sum(n for n, _ in pooled.values())
        left_out = f"; left out: {', '.join(sorted(withheld))} (statistics withheld)" if withheld else ""
        profile = error_profile(
            pooled,
            f"the model against protocol-following labels on the held-out test patients of "
            f"{len(pooled)} internal site(s) ({n_slices} slices){left_out}",
            withheld=withheld,
            withheld_keys=withheld_keys,
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


__all__ = [
    "P_EXCEEDS",
    "WITHHELD_FEW_SLICES",
    "attribute",
    "attribute_all",
    "covering_checks",
    "protocol_agrees_with_site",
    "study_attribution",
    "systematic_in_profile",
]
