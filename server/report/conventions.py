"""The report's section on label conventions and model errors: model or labels, decided per finding.

Each finding shows the coordinator's attribution (``site_convention`` | ``model`` |
``undetermined``, see ``common.attribution``) with its evidence; beside them the model's own
systematic errors (its error profile from the internal test split) and each site's
model-free label audit. The sites x findings matrix and its figure mark each cell's
attribution; impact sentences are kept for the sites' conventions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from common.pooling import usable_sites
from protocols.classes import TISSUES
from protocols.payloads import ClassScores, PolarMap
from protocols.report import StudyReport
from server import figures
from server.report.blocks import Block, Bullets, Heading, Image, Table, Text
from server.report.findings import (
    ATTRIBUTION_TEXT,
    audit_display,
    findings_matrix,
    impact_sentences,
    profile_lines,
    site_findings,
    site_findings_display,
)
from server.report.tables import harmonised_table


def human_key(key: str) -> str:
    """ "muscle/site_excludes/psoas" -> "muscle: site excludes psoas" (a column name for people)."""
    tissue, direction, region = key.split("/")
    return f"{tissue}: {direction} {region}".replace("_", " ")


def _attribution_text(report: StudyReport) -> Text:
    if report.task != "evaluate":
        return Text(
            "A comparison of two label sets has no model: each finding is a difference between the site's "
            "labels and its reference masks, shown as the site sent it (not attributed)."
        )
    return Text(
        "Each finding compares the site's labels with the model's protocol-applied prediction and says "
        "whose difference it is, from evidence that needs no other site: 'site convention' when the "
        "site's own label audit (its labels checked against the study protocol on its images, without any "
        "model) shows the same deviation; 'model' when the audit finds the labels following the protocol "
        "there, when the protocol labels as the site does, or when it is no more frequent than in the "
        "model's own error profile; 'undetermined' otherwise. Systematic = consistent across slices (the "
        "95% interval of the share of slices lies above one half), whatever its size."
    )


def _profile_blocks(report: StudyReport) -> list[Block]:
    if report.task != "evaluate":
        return []
    blocks: list[Block] = [Heading("The model's own systematic errors", 3)]
    profile = report.error_profile
    if profile is None:
        return [
            *blocks,
            Text(
                "No internal site in this study: the model's own errors on protocol-following labels "
                "are not known here, and findings are attributed from the sites' label audits alone."
            ),
        ]
    lines = profile_lines(profile)
    blocks.append(Text(f"From {profile.source}."))
    blocks.append(
        Bullets(tuple(lines))
        if lines
        else Text("None: no kind of difference is consistent across the internal test slices.")
    )
    return blocks


def _matrix_blocks(report: StudyReport) -> list[Block]:
    prevalence, systematic, attribution = findings_matrix(report)
    roles = {s.site: s.role for s in report.sites}
    if prevalence.empty:
        return [Text("No site reported a finding.")]
    shown = prevalence.copy().astype(object)
    for site in prevalence.index:
        for key in prevalence.columns:
            value = prevalence.loc[site, key]
            short = figures.ATTRIBUTION_STYLE[attribution.loc[site, key]][2]
            shown.loc[site, key] = (
                "" if math.isnan(value) else f"{value:.0%}" + (f" ({short})" if short else "")
            )
    shown.columns = [human_key(k) for k in shown.columns]
    marks = systematic.copy()
    marks.columns = shown.columns
    return [
        Table(
            shown,
            "Share of slices showing each finding (class/direction/region), with whose difference it is: "
            "(site) = a label convention of the site, (model) = the model's error, (?) = undetermined. "
            "Highlighted = systematic. Empty = not reported by that site.",
            index=True,
            highlight=marks,
        ),
        Image(
            "findings_matrix",
            figures.findings_matrix_figure(
                prevalence.to_numpy(),
                systematic.to_numpy(),
                [f"{site} ({roles[site]})" if roles.get(site) else site for site in prevalence.index],
                list(prevalence.columns),
                attribution.to_numpy(),
                ATTRIBUTION_TEXT,
            ),
            "Findings x sites: share of slices, and whose difference each is.",
        ),
    ]


def _site_blocks(report: StudyReport) -> list[Block]:
    blocks: list[Block] = []
    for s in usable_sites(report):
        found = site_findings(s)
        if not found:
            continue
        frame, marks = site_findings_display(found)
        n = s.payload.discrepancy.n_slices if s.payload and s.payload.discrepancy else found[0].n_slices
        role = f" ({s.role})" if s.role else ""
        blocks += [
            Heading(f"Findings at {s.site}{role}", 3),
            Table(
                frame,
                f"{s.site}{role}: findings over {n} slices, systematic first. Consistency: slices where the "
                "net difference is present (95% Wilson interval); net area per slice with its 95% t "
                "interval; SMI shift and changed sarcopenia calls if the site labelled like the test. "
                "Evidence: why the attribution.",
                highlight=marks,
            ),
        ]
    return blocks


def _audit_blocks(report: StudyReport) -> list[Block]:
    frame, lines = audit_display(report)
    if frame.empty and not lines:
        return []
    blocks: list[Block] = [
        Heading("Label audit (model-free)", 3),
        Text(
            f"Each site's labels checked against the {report.protocol.name} protocol on its own images (HU "
            "ranges, body regions), without any model or reference masks. Conventions = deviations "
            "consistent across slices."
        ),
    ]
    if not frame.empty:
        blocks.append(Table(frame, "Label conventions the audits found, per site."))
    if lines:
        blocks.append(Bullets(tuple(lines)))
    return blocks


#: The most sites the polar-map figure shows (a band of panels per class and direction, three
#: sites to a row): thirty sites made a figure 400 inches tall that took 80 s to draw.
POLAR_MAX_SITES = 6


def discordant_per_slice(polar: PolarMap) -> float:
    """A site's discordant area in all its maps, cm² per slice (what ranks sites for the figure)."""
    total = sum(value for grid in polar.maps.values() for row in grid for value in row)
    return total / max(polar.n_slices, 1)


def _polar_blocks(report: StudyReport) -> list[Block]:
    polar = {
        s.site: s.payload.discrepancy.polar
        for s in usable_sites(report)
        if s.payload and s.payload.discrepancy and s.payload.discrepancy.polar
    }
    if not polar:
        return []
    caption = (
        "Where the site's labels and the test disagree: discordant cm² per slice by angle and "
        "normalised radius (0 centre, 1 outline), each site divided by its own slice count; angles "
        "as the sites' discrepancy analysis defines them."
    )
    if len(polar) > POLAR_MAX_SITES:
        ranked = sorted(polar, key=lambda site: (-discordant_per_slice(polar[site]), site))
        shown = set(ranked[:POLAR_MAX_SITES])
        caption += (
            f" Shown: the {POLAR_MAX_SITES} of {len(polar)} sites with the most discordant area per slice; "
            "every site's maps are in report.json (payload.discrepancy.polar)."
        )
        polar = {site: m for site, m in polar.items() if site in shown}  # the report's site order
    keys = sorted(  # the maps of the sites shown: no empty band for a site left out
        {k for m in polar.values() for k in m.maps},
        key=lambda k: (TISSUES.index(k.split(":")[0]) if k.split(":")[0] in TISSUES else 9, k),
    )
    return [Image("polar_maps", figures.polar_maps_figure(polar, keys), caption)]


def _harmonised_blocks(report: StudyReport) -> list[Block]:
    harmonised = {
        s.site: s.payload
        for s in usable_sites(report)
        if s.payload is not None and s.payload.harmonised_scores
    }
    if not harmonised:
        return []
    blocks: list[Block] = [
        Heading("Harmonised rescoring (muscle)", 3),
        Text(
            "Both masks cut to the HU ranges before scoring: contour and density conventions mostly vanish."
        ),
    ]
    bars: dict[str, Mapping[str, ClassScores]] = {}
    for site, p in harmonised.items():
        role = f" ({p.role})" if p.role else ""
        blocks.append(
            Table(
                harmonised_table(p.scores, p.harmonised_scores or {}),
                f"{site}{role}: muscle IoU bins as scored and harmonised.",
                index=True,
            )
        )
        bars[f"{site}\nscored"] = p.scores
        bars[f"{site}\nharmonised"] = p.harmonised_scores or {}
    blocks.append(
        Image(
            "harmonised_muscle",
            figures.iou_bins_figure(bars, ("muscle",)),
            "Muscle IoU bins, as scored vs harmonised.",
        )
    )
    return blocks


def conventions_section(report: StudyReport) -> list[Block]:
    """Label conventions and model errors: attribution, the model's profile, findings, audits, impact."""
    impacts = [line for s in usable_sites(report) for line in impact_sentences(s)]
    impact: list[Block] = (
        [Heading("Impact of the sites' label conventions", 3), Bullets(tuple(impacts))] if impacts else []
    )
    return [
        Heading("Label conventions and model errors"),
        _attribution_text(report),
        *_profile_blocks(report),
        Heading("Findings across sites", 3),
        *_matrix_blocks(report),
        *_site_blocks(report),
        *_audit_blocks(report),
        *impact,
        *_polar_blocks(report),
        *_harmonised_blocks(report),
    ]


__all__ = ["conventions_section"]
