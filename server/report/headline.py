"""The report's first screen: two sentences on the model, then the verdict table, a row per site.

:func:`model_sentences` says how the model does on internal data (the internal sites' pooled
muscle top-bin share with its 95% interval and what it is pooled over, against the external
sites' with a two-sided Fisher exact test) and what its own systematic errors are (its error
profile). :func:`verdict_display` is the verdict table: each site's role, what it was scored
on, its muscle and MSV top-bin shares, the harmonised share, the label conventions attributed
to it with their effect, and its verdict (``verdict``). Called by ``document``; the CSV form
of the verdicts is in the sites table (``tables.sites_table``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import pandas as pd

from common.attribution import systematic_in_profile
from common.pooling import usable_payloads
from common.stats import mean_interval, proportions_differ_p
from protocols.findings import ErrorProfile
from protocols.report import StudyReport
from server.report.blocks import Block, Table, Text
from server.report.findings import model_error_phrase, site_findings
from server.report.glance import share_text
from server.report.groups import Group, counts_text
from server.report.verdict import (
    ALPHA,
    MIN_CONVENTION_SHARE,
    MIN_SLICES,
    convention_effect,
    convention_phrase,
    site_conventions,
    top_bin,
    with_verdicts,
)

#: The verdict table's HTML id (``#verdict``).
VERDICT_ID: Final = "verdict"
VERDICT_COLUMNS: Final = (
    "site",
    "role",
    "scored",
    "muscle IoU ≥ 0.9 (95% CI)",
    "MSV IoU ≥ 0.9",
    "harmonised muscle IoU ≥ 0.9",
    "label conventions of the site (effect)",
    "verdict",
)


def _group(groups: Sequence[Group], role: str) -> Group | None:
    return next((g for g in groups if g.role == role), None)


def _group_share(g: Group) -> str:
    """ "15/18 = 83% of slices (95% CI 61%–94%; pooled over 18 slices of 16 patients at 2 internal sites:
    hospital-a, hospital-f)"."""
    pooled = g.pooled
    counts = counts_text(pooled.n_used, pooled.n_groups, len(pooled.sites)).replace(
        " site", f" {g.role} site"
    )
    coverage = pooled.coverage("scores.muscle.bins")
    missing = "" if coverage.complete else f"; {coverage.describe()}"
    share = share_text(pooled.scores.get("muscle"))
    if " (95% CI " in share:
        head, interval = share.split(" (95% CI ")
        share = f"{head} of slices (95% CI {interval.rstrip(')')}; "
    else:
        share += " of slices ("
    return f"{share}pooled over {counts}: {', '.join(pooled.sites)}{missing})"


def performance_sentence(groups: Sequence[Group]) -> str:
    """Internal performance with its interval and pooling, and external compared with a stated test."""
    internal, external = _group(groups, "internal"), _group(groups, "external")
    if internal is None:
        return (
            "No internal site was scored: the model's performance on held-out data from the sites that "
            "trained it is not known in this study."
        )
    text = (
        "On held-out test patients of the sites that trained it, the model reaches muscle IoU ≥ 0.9 on "
        f"{_group_share(internal)}"
    )
    if external is not None:
        text += f"; at the external sites on {_group_share(external)}"
        a, b = top_bin(internal.pooled.scores.get("muscle")), top_bin(external.pooled.scores.get("muscle"))
        if a is not None and b is not None and a.n and b.n:
            p = proportions_differ_p(a.k, a.n, b.k, b.n)
            text += f" (internal vs external: two-sided Fisher exact test, p = {p:.2g})"
    return text + "."


def profile_sentence(profile: ErrorProfile | None) -> str:
    """The model's own systematic errors, from its error profile, in one sentence."""
    if profile is None:
        return "Its own systematic errors are not known: no internal site's test patients were scored."
    where = (
        f"against protocol-following labels on {profile.n_slices} internal test slices at "
        f"{profile.n_sites} sites"
    )
    keys = systematic_in_profile(profile)
    if not keys:
        return f"It shows no systematic error of its own ({where})."
    parts = []
    for key in keys:
        s = profile.key_stats[key]
        what = model_error_phrase(key)
        area = mean_interval(s.n, s.sum_net_cm2, s.sum_sq_net_cm2).mean
        net = f", {area:.1f} cm² per slice" if area is not None else ""
        parts.append(f"it {what} (on {s.n_present} of {s.n} slices{net})")
    return f"Its own systematic errors ({where}): " + "; ".join(parts) + "."


def model_sentences(report: StudyReport, groups: Sequence[Group]) -> str:
    """The two sentences above the verdict table."""
    return f"{performance_sentence(groups)} {profile_sentence(report.error_profile)}"


def verdict_display(report: StudyReport) -> pd.DataFrame:
    """The verdict table for people, a row per site in report order (verdicts recomputed)."""
    report = with_verdicts(report)
    payloads = usable_payloads(report)
    rows = []
    for s in report.sites:
        p = payloads.get(s.site)
        conventions = site_conventions(s)
        if p is None:
            cells = [s.status, *["-"] * 4]  # the verdict says why, in words
        else:
            harmonised = (p.harmonised_scores or {}).get("muscle")
            named = "; ".join(f"{convention_phrase(f)} ({convention_effect(f)})" for f in conventions)
            cells = [
                counts_text(p.n_used, p.n_groups) + (" (test split)" if p.split == "test" else ""),
                share_text(p.scores.get("muscle")),
                share_text(p.scores.get("msv"), interval=False),
                share_text(harmonised, interval=False) if harmonised is not None else "not sent",
                named or ("none" if site_findings(s) or p.label_audit is not None else "-"),
            ]
        verdict = s.verdict.sentence if s.verdict else "-"
        rows.append([s.site, s.role or "-", *cells, verdict])
    return pd.DataFrame(rows, columns=list(VERDICT_COLUMNS))


VERDICT_CAPTION: Final = (
    "Does the model work at each site? IoU ≥ 0.9: share of the site's slices where the class is defined "
    "(internal sites: held-out test patients only), muscle with its 95% Wilson interval."
)


def rules_text() -> str:
    """How the verdict is decided, under the table (in full: docs/REPORT.md)."""
    return (
        "How the verdict is decided: the site's muscle share against the internal sites' pooled share (for "
        f"an internal site, the other internal sites'), two-sided Fisher exact test at {ALPHA:g}. Not "
        "significantly lower: as on internal data. Significantly lower: explained by labelling when the site "
        "has a systematic muscle convention of its own (attributed by its label audit, see 'Label "
        f"conventions and model errors') that changes at least {MIN_CONVENTION_SHARE:.0%} of the muscle "
        f"area, else the model underperforms. Fewer than {MIN_SLICES} slices: too few to tell. Harmonised: "
        "both masks cut to the protocol's HU ranges before scoring (shown, not used: a region convention "
        "survives it). Effects: on the site's own numbers, per slice. Rules in full: docs/REPORT.md."
    )


def headline_blocks(report: StudyReport, groups: Sequence[Group]) -> list[Block]:
    """The first screen after the title: the model in two sentences, then the verdict table
    (evaluate studies; a comparison of label sets has no model and no verdict)."""
    if report.task != "evaluate" or not report.sites:
        return []
    return [
        Text(model_sentences(report, groups)),
        Table(verdict_display(report), VERDICT_CAPTION, id=VERDICT_ID),
        Text(rules_text()),
    ]


__all__ = [
    "VERDICT_CAPTION",
    "VERDICT_COLUMNS",
    "VERDICT_ID",
    "headline_blocks",
    "model_sentences",
    "performance_sentence",
    "profile_sentence",
    "rules_text",
    "verdict_display",
]
