"""The report's content: its sections as blocks (headings, text, tables, figures), format-independent.

:func:`build_document` turns a :class:`~protocols.report.StudyReport` into blocks that
``render`` draws as Markdown or HTML. Every caption that shows a pooled number also says
which sites it is over (``protocols.pooled.Coverage``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from common.cutoffs import get_cutoff_set
from common.pooling import pool_payloads, usable_payloads
from protocols.classes import METRIC_CLASSES, SEED_COLUMN, TISSUES
from protocols.payloads import AreaAgreement, ClassScores, EvaluationPayload, SmiAgreement
from protocols.pooled import PooledResults
from protocols.report import RoundRecord, StudyReport
from server import figures
from server.report.blocks import Block, Bullets, Heading, Image, Table, Text
from server.report.sentences import attribution_lines, consistency_notes, impact_sentences, test_phrase
from server.report.tables import (
    COVERAGE_COLUMN,
    NOT_POOLABLE,
    POOLED,
    POOLED_TABLE_PATHS,
    area_table,
    coverage_text,
    findings_matrix,
    harmonised_table,
    iou_summary_table,
    pooled_seed_table,
    sarcopenia_table,
    seed_table,
    sites_table,
    smi_table,
    training_table,
)


def _header(report: StudyReport, n_usable: int) -> list[Block]:
    cut = get_cutoff_set(report.cutoff_set)
    men = f"men < {cut.men}" + (f" (< {cut.men_bmi25} if BMI >= 25)" if cut.men_bmi25 is not None else "")
    spec = ", ".join(f"{k}={v}" for k, v in (report.model_spec or {}).items()) or "none (no model)"
    return [
        Heading(f"Study report: {report.study_name}", 1),
        Bullets(
            (
                f"Run {report.run_id}, created {report.created}, sarcofed {report.sarcofed_version}, "
                f"report schema {report.schema_version}.",
                f"Task: {report.task} (test = {test_phrase(report.task)}; label = the site's labels, "
                "taken as truth; differences are test - label).",
                f"Model hash: {report.model_hash or 'none'}; model: {spec}.",
                f"SMI cut-off set: {cut.name.value} ({men}, women < {cut.women} cm²/m²; {cut.note}). "
                f"{cut.citation}",
                f"Label protocol: {report.protocol.describe()}. The model's prediction is cut to these HU "
                "ranges before it is scored (raw scores are kept beside).",
                f"Sites: {n_usable} of {len(report.sites)} returned a usable result.",
            )
        ),
    ]


def _sites_section(report: StudyReport) -> list[Block]:
    blocks: list[Block] = [
        Heading("Sites"),
        Table(
            sites_table(report), "Dataset fingerprint = what each site scored (no file name leaves a site)."
        ),
    ]
    unusable = [s for s in report.sites if s.status != "ok"]
    if unusable:
        blocks += [
            Text("Sites without a usable result:"),
            Bullets(
                tuple(
                    f"{s.site}"
                    + (f" (node {s.node_id})" if s.node_id is not None else "")
                    + f": {s.status} - {s.reason or 'no reason given'}"
                    for s in unusable
                )
            ),
        ]
    notes = [*report.notes, *consistency_notes(report)]
    if notes:
        blocks += [Heading("Notes", 3), Bullets(tuple(notes))]
    return blocks


def _training_section(rounds: Sequence[RoundRecord]) -> list[Block]:
    if not rounds:
        return []
    return [
        Heading("Training rounds"),
        Table(
            training_table(rounds),
            "Pooled validation loss = sum of the sites' validation losses / their validation slices; "
            "IoU pooled over pixels.",
        ),
        Image("training_loss", figures.training_figure(rounds), "Validation loss per round."),
    ]


def _pooled_state(pooled: PooledResults, table: str) -> str:
    """ "Pooled row: complete: all 3 sites." for a table's caption."""
    return f"Pooled row: {pooled.coverage(*POOLED_TABLE_PATHS[table]).describe()}."


def _pooled_bins_caption(pooled: PooledResults, n_sites: int) -> str:
    table = pooled.coverage(*POOLED_TABLE_PATHS[f"{POOLED}_iou_bins"])
    if table.complete:
        return f"Pooled: counts summed over {n_sites} sites ({pooled.n_used} slices); {table.describe()}."
    by_column = {
        SEED_COLUMN[c]: pooled.coverage(f"scores.{c}.bins", f"scores.{c}.undefined") for c in METRIC_CLASSES
    }
    return (
        f"Pooled: counts summed over the sites that sent them, not over all {n_sites} sites: "
        f"{coverage_text(by_column)}. No ratio: the counts do not cover the same slices."
    )


def _scores_section(payloads: Mapping[str, EvaluationPayload], pooled: PooledResults) -> list[Block]:
    blocks: list[Block] = [
        Heading("IoU bins (the seed's Table 2 layout)"),
        Text(
            "Slices per IoU bin for M (muscle), S (subcutaneous fat), V (visceral fat) and MSV (the three "
            "together: intersection/union summed over the three). Ratio = row total / defined slice-class "
            "cells (the seed divides by 4 x slices, which assumes every class is defined on every slice); "
            "the 'undefined' row counts slices where the class is empty in both masks, over all cells."
        ),
    ]
    several = len(payloads) > 1
    if several:
        frame = pooled_seed_table(pooled).drop(columns=COVERAGE_COLUMN)  # stated in the caption
        blocks.append(Table(frame, _pooled_bins_caption(pooled, len(payloads)), index=True))
    for site, p in payloads.items():
        blocks.append(Table(seed_table(p.scores, p.n_used), f"{site}: {p.n_used} slices.", index=True))
    columns: dict[str, Mapping[str, ClassScores]] = {site: p.scores for site, p in payloads.items()}
    summary = pooled.coverage(*POOLED_TABLE_PATHS["iou_summary"])
    bins_caption = "Share of slices per IoU bin."
    if several:
        bins = pooled.coverage(*POOLED_TABLE_PATHS[f"{POOLED}_iou_bins"])
        columns[POOLED if bins.complete else f"{POOLED}\n(incomplete)"] = pooled.scores
        bins_caption += f" Pooled bar: {bins.describe()}."
    blocks += [
        Image("iou_bins", figures.iou_bins_figure(columns, METRIC_CLASSES), bins_caption),
        Heading("IoU and Dice summary", 3),
        Table(
            iou_summary_table(payloads, pooled if several else None),
            "Mean and sd over slices where the class is defined (pooled row: exact over "
            + ("all sites' slices" if summary.complete else "the slices of the sites that sent them")
            + f"); median and quartiles of the pooled row are {NOT_POOLABLE} from summaries; "
            "iou_pooled_over_pixels = summed intersection / summed union."
            + (f" Pooled row: {summary.describe()}." if several else ""),
        ),
    ]
    return blocks


def _agreement_section(
    report: StudyReport, payloads: Mapping[str, EvaluationPayload], pooled: PooledResults
) -> list[Block]:
    shown = pooled if len(payloads) > 1 else None
    area_rows: dict[str, Mapping[str, AreaAgreement]] = {site: p.areas for site, p in payloads.items()}
    if shown is not None:
        area_rows[POOLED] = shown.areas

    def state(table: str) -> str:
        return f" {_pooled_state(shown, table)}" if shown is not None else ""

    test = test_phrase(report.task)
    blocks: list[Block] = [
        Heading("Area agreement"),
        Table(
            area_table(payloads, shown),
            f"Tissue areas, test ({test}) - label, cm²; limits = mean ± 1.96 sd. Pooled mean HU is the "
            "sites' mean HU weighted by slices (exact only when the tissue is on every slice)."
            + state("area_agreement"),
        ),
        Image(
            "area_agreement",
            figures.area_agreement_figure(area_rows, TISSUES),
            "Area agreement per site." + state("area_agreement"),
        ),
    ]
    smi_sites = {site: p for site, p in payloads.items() if p.smi is not None and p.smi.n > 0}
    smi_pooled = shown if shown is not None and shown.smi is not None and shown.smi.n > 0 else None
    smi_rows: dict[str, SmiAgreement] = {site: p.smi for site, p in smi_sites.items() if p.smi is not None}
    if smi_pooled is not None and smi_pooled.smi is not None:
        smi_rows[POOLED] = smi_pooled.smi
    if smi_rows:
        blocks += [
            Heading("Skeletal muscle index (SMI) agreement"),
            Table(
                smi_table(smi_sites, smi_pooled),
                "SMI in cm²/m² over slices with a known height; test - label."
                + (state("smi_agreement") if smi_pooled is not None else ""),
            ),
            Image(
                "smi_agreement",
                figures.smi_figure(smi_rows),
                "SMI agreement per site." + (state("smi_agreement") if smi_pooled is not None else ""),
            ),
        ]
    frame = sarcopenia_table(payloads, shown)
    if not frame.empty:
        with_pooled = shown is not None and shown.sarcopenia is not None
        blocks += [
            Heading("Sarcopenia calls"),
            Table(
                frame,
                "Slices called sarcopenic by the label (truth) and by the test, cut-off set "
                f"{report.cutoff_set}; unknown = no height or sex. Counts are slices (a patient with "
                "several slices counts several times)."
                + (state("sarcopenia_confusion") if with_pooled else ""),
            ),
        ]
    return blocks


def _conventions_section(payloads: Mapping[str, EvaluationPayload], task: str) -> list[Block]:
    blocks: list[Block] = [Heading("Label conventions")]
    prevalence, systematic = findings_matrix(payloads)
    if prevalence.empty:
        blocks.append(Text("No site reported a label-convention finding."))
    else:
        shown = prevalence.map(lambda v: "" if math.isnan(v) else f"{v:.0%}")
        blocks += [
            Table(
                shown,
                "Share of slices showing each finding (class/direction/region); highlighted = systematic. "
                "Empty = not reported by that site.",
                index=True,
                highlight=systematic,
            ),
            Image(
                "findings_matrix",
                figures.findings_matrix_figure(
                    prevalence.to_numpy(),
                    systematic.to_numpy(),
                    list(prevalence.index),
                    list(prevalence.columns),
                ),
                "Sites x findings.",
            ),
        ]
    attribution = attribution_lines(payloads, task)
    if attribution:
        blocks += [
            Heading("Model or site? Shared versus site-specific findings", 3),
            Bullets(tuple(attribution)),
        ]
    impacts = [line for site, p in payloads.items() for line in impact_sentences(site, p)]
    if impacts:
        blocks += [Heading("Impact of systematic findings", 3), Bullets(tuple(impacts))]
    polar = {
        site: p.discrepancy.polar for site, p in payloads.items() if p.discrepancy and p.discrepancy.polar
    }
    if polar:
        keys = sorted(
            {k for m in polar.values() for k in m.maps},
            key=lambda k: (TISSUES.index(k.split(":")[0]) if k.split(":")[0] in TISSUES else 9, k),
        )
        blocks.append(
            Image(
                "polar_maps",
                figures.polar_maps_figure(polar, keys),
                "Where the site's labels and the test disagree: discordant cm² per slice by angle and "
                "normalised radius (0 centre, 1 outline), each site divided by its own slice count; angles "
                "as the sites' discrepancy analysis defines them.",
            )
        )
    harmonised = {site: p for site, p in payloads.items() if p.harmonised_scores}
    if harmonised:
        blocks += [
            Heading("Harmonised rescoring (muscle)", 3),
            Text(
                "Both masks cut to the HU ranges before scoring: contour and density conventions "
                "mostly vanish."
            ),
        ]
        bars: dict[str, Mapping[str, ClassScores]] = {}
        for site, p in harmonised.items():
            blocks.append(
                Table(
                    harmonised_table(p.scores, p.harmonised_scores or {}),
                    f"{site}: muscle IoU bins.",
                    index=True,
                )
            )
            bars[f"{site}\nraw"] = p.scores
            bars[f"{site}\nharmonised"] = p.harmonised_scores or {}
        blocks.append(
            Image(
                "harmonised_muscle",
                figures.iou_bins_figure(bars, ("muscle",)),
                "Muscle IoU bins, raw vs harmonised.",
            )
        )
    return blocks


def build_document(report: StudyReport) -> list[Block]:
    """The report's content, independent of the output format."""
    payloads = usable_payloads(report)
    blocks = [*_header(report, len(payloads)), *_sites_section(report), *_training_section(report.training)]
    if not payloads:
        return [
            *blocks,
            Heading("Results"),
            Text("No site returned a usable result: nothing to score or pool."),
        ]
    pooled = pool_payloads(payloads)
    return [
        *blocks,
        *_scores_section(payloads, pooled),
        *_agreement_section(report, payloads, pooled),
        *_conventions_section(payloads, report.task),
    ]
