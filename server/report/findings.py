"""Findings in the report: each site's findings with the coordinator's attribution, the model's own
systematic errors, and each site's label audit.

A finding's attribution (``site_convention`` | ``model`` | ``undetermined``) and its evidence
are decided per finding by ``common.attribution`` (the site's label audit and the model's
error profile from the internal test split) and stored in ``SiteResult.findings``; this
module only shows them. A comparison of two label sets has no model, so its findings are
shown as the sites sent them, not attributed.
"""

from __future__ import annotations

import math
from typing import Final

import pandas as pd

from common.attribution import systematic_in_profile
from common.pooling import usable_sites
from common.release_words import REGION_TEXT
from common.stats import mean_interval, wilson_interval
from protocols.classes import TISSUES
from protocols.findings import DIRECTIONS, REGIONS, Attribution, AuditCheck, ErrorProfile, Finding
from protocols.report import SiteResult, StudyReport
from server.report.groups import role_name
from server.report.tables import ROLE_COLUMN

ATTRIBUTION_TEXT: Final[dict[Attribution | None, str]] = {
    "site_convention": "site convention",
    "model": "model",
    "undetermined": "undetermined",
    None: "not attributed",
}
TISSUE_TEXT: Final[dict[str, str]] = {t: t.replace("_", " ") for t in TISSUES}


# --------------------------------------------------------------------------- which findings


def site_findings(result: SiteResult) -> list[Finding]:
    """The findings the report shows for a site: the coordinator's attributed ones, or (when it
    attributed none, e.g. a comparison of label sets) the site's own, one per class/direction/region."""
    if result.findings:
        return list(result.findings)
    p = result.payload
    if p is None:
        return []
    unique: dict[tuple[str, str, str], Finding] = {}
    for f in [*(p.discrepancy.findings if p.discrepancy else []), *p.findings]:
        unique.setdefault((f.tissue, f.direction, f.region), f)
    return list(unique.values())


def finding_key(f: Finding | AuditCheck) -> str:
    """ "class/direction/region": one finding's name across sites."""
    return f"{f.tissue}/{f.direction}/{f.region}"


def _key_order(key: str) -> tuple[int, int, int]:
    tissue, direction, region = key.split("/")
    return TISSUES.index(tissue), DIRECTIONS.index(direction), REGIONS.index(region)


def findings_by_site(report: StudyReport) -> tuple[dict[str, dict[str, Finding]], list[str]]:
    """Site -> finding key -> finding (sites without a finding left out), and every key in
    class/direction/region order: the sites x findings matrix."""
    per_site = {s.site: {finding_key(f): f for f in site_findings(s)} for s in usable_sites(report)}
    per_site = {site: found for site, found in per_site.items() if found}
    keys = sorted({k for found in per_site.values() for k in found}, key=_key_order)
    return per_site, keys


# --------------------------------------------------------------------------- numbers in words


def consistency_text(f: Finding | AuditCheck) -> str:
    """ "7 of 8 slices (95% CI 53–98%)"."""
    n = f.n_slices
    k = f.n_present if f.n_present is not None else round(f.prevalence * n)
    low, high = (
        (f.prevalence_low, f.prevalence_high)
        if f.prevalence_low is not None and f.prevalence_high is not None
        else wilson_interval(k, n)
    )
    return f"{k} of {n} slices (95% CI {low:.0%}–{high:.0%})"


def interval_text(
    mean: float | None, low: float | None, high: float | None, unit: str, sign: bool = False
) -> str:
    """ "12.4 cm² (95% CI 10.1 to 14.7)"; "-" without a mean."""
    if mean is None:
        return "-"
    fmt = "+.1f" if sign else ".1f"
    text = f"{mean:{fmt}} {unit}"
    return text + (f" (95% CI {low:{fmt}} to {high:{fmt}})" if low is not None and high is not None else "")


def _net_area(f: Finding) -> str:
    """The net area per slice with its interval (as the SMI shift is net); the one-direction
    discordant area, said so, from a site that sent no net area."""
    if f.mean_net_area_cm2 is None:
        return f"{f.mean_area_cm2:.1f} cm² (discordant, not net)"
    return interval_text(f.mean_net_area_cm2, f.net_area_low_cm2, f.net_area_high_cm2, "cm²")


def _calls(f: Finding) -> str:
    return f"{f.calls_changed} of {f.calls_known}" if f.calls_changed is not None and f.calls_known else "-"


# --------------------------------------------------------------------------- tables


FINDING_COLUMNS: Final = (
    "class",
    "direction",
    "region",
    "systematic",
    "consistency",
    "net area per slice",
    "share of class area",
    "SMI shift",
    "sarcopenia calls changed",
    "attribution",
    "evidence",
)


def site_findings_display(findings: list[Finding]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A site's findings for people, and the cells to emphasise (a site convention's attribution)."""
    rows = [
        [
            TISSUE_TEXT[f.tissue],
            f.direction,
            f.region,
            f.systematic,
            consistency_text(f),
            _net_area(f),
            f"{f.mean_area_share:.1%}",
            interval_text(f.smi_shift_mean, f.smi_shift_low, f.smi_shift_high, "cm²/m²", sign=True),
            _calls(f),
            ATTRIBUTION_TEXT[f.attribution],
            f.evidence or f.sentence,
        ]
        for f in findings
    ]
    frame = pd.DataFrame(rows, columns=list(FINDING_COLUMNS))
    marks = pd.DataFrame(False, index=frame.index, columns=frame.columns)
    marks["attribution"] = [f.attribution == "site_convention" for f in findings]
    return frame, marks


def findings_matrix(report: StudyReport) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Sites x "class/direction/region": prevalence (NaN = not reported), systematic flags and each
    finding's ``attribution`` (``site_convention``, ``model``, ``undetermined``; None where not
    attributed or not reported); ``ATTRIBUTION_TEXT`` has the words for people."""
    per_site, columns = findings_by_site(report)
    index = pd.Index(list(per_site), name="site")
    prevalence = pd.DataFrame(
        [[found[k].prevalence if k in found else math.nan for k in columns] for found in per_site.values()],
        index=index,
        columns=columns,
        dtype=float,
    )
    systematic = pd.DataFrame(
        [[bool(k in found and found[k].systematic) for k in columns] for found in per_site.values()],
        index=index,
        columns=columns,
        dtype=bool,
    )
    attribution = pd.DataFrame(
        [[found[k].attribution if k in found else None for k in columns] for found in per_site.values()],
        index=index,
        columns=columns,
        dtype=object,
    )
    return prevalence, systematic, attribution


def findings_table(report: StudyReport) -> pd.DataFrame:
    """Every finding of every site with its attribution and evidence, long format (``findings.csv``)."""
    rows = [
        {"site": s.site, ROLE_COLUMN: role_name(s.role), **f.model_dump(mode="json", by_alias=True)}
        for s in usable_sites(report)
        for f in site_findings(s)
    ]
    return pd.DataFrame(rows)


def audit_table(report: StudyReport) -> pd.DataFrame:
    """Every check of every site's label audit, long format (``label_audit.csv``)."""
    rows = [
        {
            "site": s.site,
            ROLE_COLUMN: role_name(s.role),
            "protocol": s.payload.label_audit.protocol,
            **c.model_dump(mode="json", by_alias=True),
        }
        for s in report.sites
        if s.payload is not None and s.payload.label_audit is not None
        for c in s.payload.label_audit.checks
    ]
    return pd.DataFrame(rows)


def audit_display(report: StudyReport) -> tuple[pd.DataFrame, list[str]]:
    """The label conventions the audits found (systematic checks) for people, and a line for each
    audited site without one (and what its audit could not check)."""
    rows, lines = [], []
    for s in report.sites:
        audit = s.payload.label_audit if s.payload is not None else None
        if audit is None:
            continue
        conventions = audit.findings
        rows += [
            {
                "site": s.site,
                ROLE_COLUMN: role_name(s.role),
                "class": TISSUE_TEXT[c.tissue],
                "direction": c.direction,
                "region": c.region,
                "consistency": consistency_text(c),
                "mean area per slice": f"{c.mean_area_cm2:.1f} cm²",
                "share of class area": f"{c.mean_area_share:.1%}",
                "what the audit saw": c.sentence,
            }
            for c in conventions
        ]
        if not conventions:
            lines.append(
                f"{s.site}: no labelling convention: none of {len(audit.checks)} checks over "
                f"{audit.n_slices} slices deviates consistently from the {audit.protocol} protocol"
                + (f" (not checked: {', '.join(audit.not_checked)})" if audit.not_checked else "")
                + "."
            )
    return pd.DataFrame(rows), lines


# --------------------------------------------------------------------------- sentences


def model_error_phrase(key: str) -> str:
    """What the model does wrong, for a profile key ``tissue:direction:region``: the profile's
    direction is the labels' (the site's), so the model does the opposite."""
    tissue, direction, region = key.split(":")
    if direction == "site_excludes":
        return f"adds {REGION_TEXT[region]} to {TISSUE_TEXT[tissue]}"
    return f"leaves {REGION_TEXT[region]} out of {TISSUE_TEXT[tissue]}"


def profile_lines(profile: ErrorProfile) -> list[str]:
    """The model's own systematic errors, one line each (see ``common.attribution.systematic_in_profile``)."""
    lines = []
    for key in systematic_in_profile(profile):
        s = profile.key_stats[key]
        what = model_error_phrase(key)
        low, high = wilson_interval(s.n_present, s.n)
        area = mean_interval(s.n, s.sum_net_cm2, s.sum_sq_net_cm2)
        share = s.sum_net_share / s.n if s.n else None
        lines.append(
            f"{key.replace(':', ' / ')}: the model {what} where the labels follow the protocol, on "
            f"{s.n_present} of {s.n} internal test slices (95% CI {low:.0%}–{high:.0%}); net "
            + interval_text(area.mean, area.low, area.high, "cm²")
            + " per slice"
            + (f", {share:.1%} of the class area" if share is not None else "")
            + "."
        )
    return lines


def shows_impact(f: Finding) -> bool:
    """Whether a finding gets an impact sentence: a site convention, or a systematic finding that
    nobody attributed (a comparison of label sets)."""
    return f.attribution == "site_convention" or (f.attribution is None and f.systematic)


def impact_sentences(result: SiteResult) -> list[str]:
    """One sentence per site convention: what it does to this site's areas (net of the opposite
    direction, like the findings table and the SMI shift), SMI and sarcopenia calls."""
    p = result.payload
    if p is None:
        return []
    reference = "the model's prediction" if p.task == "evaluate" else "the reference masks"
    cutoffs = p.sarcopenia.cutoff_set if p.sarcopenia else "study cut-offs"
    out = []
    for f in site_findings(result):
        if not shows_impact(f):
            continue
        tissue = TISSUE_TEXT[f.tissue]
        region = REGION_TEXT[f.region]
        if f.direction == "site_excludes":
            effect = f"leaving out {region} lowers this site's {tissue} area"
        else:
            effect = f"including {region} raises this site's {tissue} area"
        out.append(
            f"{result.site}: {effect} by {_net_area(f)} per slice on average "
            f"({f.mean_area_share:.0%} of the {tissue} area in {reference}; seen on {f.prevalence:.0%} of "
            f"{f.n_slices} slices; {f.density_consistency:.0%} of the discordant pixels have {tissue} "
            "density)"
            + (
                f"; labelling like the reference would move its SMI by {f.smi_shift_mean:+.1f} cm²/m² on "
                f"average and change the sarcopenia call ({cutoffs}) "
                f"in {f.calls_changed} of {f.calls_known} slices with a known height."
                if f.smi_shift_mean is not None and f.calls_known
                else "."
            )
        )
    return out


__all__ = [
    "ATTRIBUTION_TEXT",
    "REGION_TEXT",
    "audit_display",
    "audit_table",
    "consistency_text",
    "finding_key",
    "findings_by_site",
    "findings_matrix",
    "findings_table",
    "impact_sentences",
    "model_error_phrase",
    "profile_lines",
    "shows_impact",
    "site_findings",
    "site_findings_display",
]
