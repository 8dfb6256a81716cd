"""The report's content: its sections as blocks (headings, text, tables, figures), format-independent.

:func:`build_document` turns a :class:`~protocols.report.StudyReport` into blocks that
``render`` draws as Markdown or HTML. Internal and external sites are pooled separately,
never together (``server.report.groups``): every per-site table and caption says the site's
role and n, every pooled table or caption names its group and n and the sites it is over
(``protocols.pooled.Coverage``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from common.cutoffs import get_cutoff_set
from protocols.classes import METRIC_CLASSES, SEED_COLUMN, TISSUES
from protocols.payloads import AreaAgreement, ClassScores, EvaluationPayload, SmiAgreement
from protocols.pooled import PooledResults
from protocols.report import RoundRecord, StudyReport
from server import figures
from server.report.agreement import agreement_display
from server.report.blocks import Block, Bullets, Heading, Image, Table, Text
from server.report.columns import for_people, short_id
from server.report.conventions import conventions_section
from server.report.glance import (
    glance_caption,
    glance_display,
    group_test_text,
    raw_protocol_caption,
    raw_protocol_display,
)
from server.report.groups import Group, counts_text, pooled_label, report_groups, site_caption
from server.report.headline import headline_blocks
from server.report.sentences import consistency_notes, test_phrase
from server.report.tables import (
    BINS_STEM,
    COVERAGE_COLUMN,
    NOT_POOLABLE,
    POOLED_TABLE_PATHS,
    area_table,
    coverage_text,
    iou_summary_table,
    pooled_seed_table,
    sarcopenia_table,
    seed_table,
    sites_table,
    smi_table,
    training_table,
)
from server.report.verdict import with_verdicts


def _roles_line(report: StudyReport) -> str | None:
    """Which sites are internal and which external, and what each was scored on."""
    internal = [s.site for s in report.sites if s.role == "internal"]
    external = [s.site for s in report.sites if s.role == "external"]
    if not internal and not external:
        return None
    parts = []
    if internal:
        parts.append(
            f"Internal sites: {', '.join(internal)} (they trained the model; scored on their held-out test "
            "patients only)."
        )
    if external:
        parts.append(
            f"External sites: {', '.join(external)} (they did not train it; scored on every usable slice)."
        )
    return " ".join(parts) + " The two are pooled separately, never together."


def _study_section(report: StudyReport, n_usable: int) -> list[Block]:
    """What the numbers depend on, in words: task, cut-offs, label protocol, roles; notes."""
    cut = get_cutoff_set(report.cutoff_set)
    men = f"men < {cut.men}" + (f" (< {cut.men_bmi25} if BMI >= 25)" if cut.men_bmi25 is not None else "")
    protocol = f"Label protocol: {report.protocol.describe()}."
    if report.task == "evaluate":
        protocol += (
            " The model's prediction is cut to these HU ranges before it is scored: every score, area, "
            "SMI, sarcopenia call and verdict in this report uses this protocol-applied prediction; the "
            "raw prediction's IoU bins are kept beside it (section 'Raw and protocol-applied prediction')."
        )
    roles = _roles_line(report)
    blocks: list[Block] = [
        Heading("About this study"),
        Bullets(
            (
                f"Task: {report.task} (test = {test_phrase(report.task)}; label = the site's labels, "
                "taken as truth; differences are test - label).",
                f"SMI cut-off set: {cut.name.value} ({men}, women < {cut.women} cm²/m²; {cut.note}).",
                protocol,
                *((roles,) if roles else ()),
                f"Sites: {n_usable} of {len(report.sites)} returned a usable result.",
            )
        ),
    ]
    unusable = [s for s in report.sites if s.status != "ok"]
    if unusable:
        blocks += [
            Text("Sites without a usable result:"),
            Bullets(
                tuple(
                    f"{s.site}"
                    + (f" ({s.role})" if s.role else "")
                    + f": {s.status} - {s.reason or 'no reason given'}"
                    for s in unusable
                )
            ),
        ]
    notes = [*report.notes, *consistency_notes(report)]
    if notes:
        blocks += [Heading("Notes", 3), Bullets(tuple(notes))]
    return blocks


def _appendix(report: StudyReport) -> list[Block]:
    """Engineering detail at the end: run, full model hash, node ids, fingerprints, the device and
    precision each site ran the model on, round records."""
    cut = get_cutoff_set(report.cutoff_set)
    spec = ", ".join(f"{k}={v}" for k, v in (report.model_spec or {}).items()) or "none (no model)"
    sites = sites_table(report).drop(columns=["verdict_code", "verdict"])
    for column in ("dataset_fingerprint", "model_hash"):
        sites[column] = [short_id(v) if isinstance(v, str) else v for v in sites[column]]
    trained_on = {site: label for r in report.training for site, label in r.compute.items()}  # the last said
    identifiers = tuple(
        f"{s.site}: node {s.node_id if s.node_id is not None else '-'}"
        + (
            f"; dataset fingerprint {s.payload.dataset_fingerprint}; model hash {s.payload.model_hash or '-'}"
            + (f"; ran on {s.payload.compute.label()}" if s.payload.compute is not None else "")
            if s.payload is not None
            else ""
        )
        + (f"; trained on {trained_on[s.site]}" if s.site in trained_on else "")
        for s in report.sites
    )
    blocks: list[Block] = [
        Heading("Appendix: engineering detail"),
        Bullets(
            (
                f"Run {report.run_id}, created {report.created}, sarcofed {report.sarcofed_version}, "
                f"report schema {report.schema_version}.",
                f"Model hash: {report.model_hash or 'none'}; model: {spec}.",
                f"SMI cut-off set {cut.name.value}: {cut.citation}",
            )
        ),
        Heading("Sites", 3),
        Table(
            for_people(sites),
            "role: internal = trained the model, scored on its held-out test patients only (split test); "
            "external = did not train it, scored on every usable slice (split all). Slices in split = "
            "manifest rows in the scored split; slices scored = slices scored. Dataset fingerprint = what "
            "each site scored (no file name leaves a site); hashes shortened, in full below.",
        ),
        Text("Full identifiers:"),
        Bullets(identifiers),
    ]
    return blocks + _training_section(report.training)


_LIMITS = (
    "Limits of agreement = mean ± 1.96 sd of the differences; 95% CI of the mean difference: t interval; "
    "of each limit: limit ± t(n-1) x sqrt(3 sd² / n) (Bland & Altman 1986, 1999), from n, mean and sd"
)


def _n(pooled: PooledResults) -> str:
    return counts_text(pooled.n_used, pooled.n_groups, len(pooled.sites))


def _glance_section(groups: Sequence[Group]) -> list[Block]:
    """Internal vs external (and each site) side by side, right after the header."""
    with_roles = [g for g in groups if g.role is not None]
    title = "Internal and external validation at a glance" if with_roles else "Sites at a glance"
    blocks: list[Block] = [Heading(title), Table(glance_display(groups), glance_caption(groups))]
    tested = group_test_text(groups)
    if tested:
        blocks.append(Text(tested))
    if with_roles:
        bars = {f"{g.role}: {_n(g.pooled)}": g.pooled.scores for g in with_roles}
        blocks.append(
            Image(
                "internal_external",
                figures.internal_external_figure(bars),
                "Share of slices per IoU bin, internal vs external, pooled separately (whiskers: 95% "
                "Wilson interval). Muscle (M) and the three tissues together (MSV).",
            )
        )
    return blocks


def _training_section(rounds: Sequence[RoundRecord]) -> list[Block]:
    if not rounds:
        return []
    return [
        Heading("Training rounds", 3),
        Table(
            for_people(training_table(rounds)),
            "Pooled validation loss = sum of the sites' validation losses / their validation slices; "
            "IoU pooled over pixels.",
        ),
        Image("training_loss", figures.training_figure(rounds), "Validation loss per round."),
    ]


def _shown(groups: Sequence[Group]) -> list[PooledResults]:
    """The pooled rows a document table shows: groups of more than one site (one site is its own pool)."""
    return [g.pooled for g in groups if len(g.payloads) > 1]


def _pooled_state(pools: Sequence[PooledResults], table: str) -> str:
    """ " Pooled rows: pooled_internal: complete: all 2 sites." for a table's caption."""
    if not pools:
        return ""
    states = "; ".join(
        f"{pooled_label(p.role)}: {p.coverage(*POOLED_TABLE_PATHS[table]).describe()}" for p in pools
    )
    return f" Pooled row{'s' if len(pools) > 1 else ''}: {states}."


def _pooled_bins_caption(group: Group) -> str:
    pooled = group.pooled
    table = pooled.coverage(*POOLED_TABLE_PATHS[BINS_STEM])
    head = f"{group.label}: {group.caption} ({', '.join(pooled.sites)})."
    if table.complete:
        return f"{head} Counts summed over the {len(pooled.sites)} sites; {table.describe()}."
    by_column = {
        SEED_COLUMN[c]: pooled.coverage(f"scores.{c}.bins", f"scores.{c}.undefined") for c in METRIC_CLASSES
    }
    return (
        f"{head} Counts summed over the sites that sent them, not over all {len(pooled.sites)} sites: "
        f"{coverage_text(by_column)}. No ratio: the counts do not cover the same slices."
    )


def _scores_section(groups: Sequence[Group]) -> list[Block]:
    blocks: list[Block] = [
        Heading("IoU bins (the seed's Table 2 layout)"),
        Text(
            "Slices per IoU bin for M (muscle), S (subcutaneous fat), V (visceral fat) and MSV (the three "
            "together: intersection/union summed over the three). Ratio = row total / defined slice-class "
            "cells (the seed divides by 4 x slices, which assumes every class is defined on every slice); "
            "the 'undefined' row counts slices where the class is empty in both masks, over all cells. "
            "Internal and external sites are pooled separately, never together."
        ),
    ]
    columns: dict[str, Mapping[str, ClassScores]] = {}
    for g in groups:
        blocks.append(Heading(g.title, 3))
        several = len(g.payloads) > 1
        if several:
            frame = pooled_seed_table(g.pooled).drop(columns=COVERAGE_COLUMN)  # stated in the caption
            blocks.append(Table(frame, _pooled_bins_caption(g), index=True))
        for site, p in g.payloads.items():
            alone = not several and g.role is not None
            caption = site_caption(site, p) + (
                f" The only {g.role} site: this table is the {g.role} group ({g.caption})." if alone else ""
            )
            blocks.append(Table(seed_table(p.scores, p.n_used), caption, index=True))
            columns[f"{site}\n({g.role})" if g.role else site] = p.scores
        if several:
            bins = g.pooled.coverage(*POOLED_TABLE_PATHS[BINS_STEM])
            columns[g.label.replace("_", "\n") + ("" if bins.complete else "\n(incomplete)")] = (
                g.pooled.scores
            )
    shown = _shown(groups)
    blocks += [
        Image(
            "iou_bins",
            figures.iou_bins_figure(columns, METRIC_CLASSES),
            "Share of slices per IoU bin, each site (with its role) and each group of several sites "
            "pooled on its own." + _pooled_state(shown, BINS_STEM).replace("Pooled row", "Pooled bar"),
        ),
        Heading("IoU and Dice summary", 3),
        Table(
            for_people(iou_summary_table({s: p for g in groups for s, p in g.payloads.items()}, shown)),
            "Mean and sd over slices where the class is defined (pooled rows: exact over the slices of "
            f"their group's sites that sent them); median and quartiles of a pooled row are {NOT_POOLABLE} "
            "from summaries; iou_pooled_over_pixels = summed intersection / summed union."
            + _pooled_state(shown, "iou_summary"),
        ),
    ]
    return blocks


def _raw_protocol_section(groups: Sequence[Group]) -> list[Block]:
    """Raw and protocol-applied prediction side by side, per group (evaluate studies)."""
    with_raw = [g for g in groups if any(p.raw_scores for p in g.payloads.values())]
    if not with_raw:
        return []
    blocks: list[Block] = [
        Heading("Raw and protocol-applied prediction"),
        Text(
            "The verdicts use the protocol-applied prediction (cut to the protocol's HU ranges); the raw "
            "prediction is shown for comparison. Muscle (M) and the three tissues together (MSV)."
        ),
    ]
    for g in with_raw:
        blocks.append(Table(raw_protocol_display(g.pooled), raw_protocol_caption(g), index=True))
    return blocks


def _agreement_section(report: StudyReport, groups: Sequence[Group]) -> list[Block]:
    payloads: dict[str, EvaluationPayload] = {s: p for g in groups for s, p in g.payloads.items()}
    shown = _shown(groups)
    area_rows: dict[str, Mapping[str, AreaAgreement]] = {site: p.areas for site, p in payloads.items()}
    area_rows |= {g.label: g.pooled.areas for g in groups if len(g.payloads) > 1}
    test = test_phrase(report.task)
    blocks: list[Block] = [
        Heading("Area agreement"),
        Table(
            agreement_display(area_table(payloads, shown), "_cm2"),
            f"Tissue areas, test ({test}) - label, cm², per site over its slices and per group pooled over "
            f"its sites' slices (exact from n, sum, sum of squares). {_LIMITS}. Pooled mean HU is the "
            "sites' mean HU weighted by slices (exact only when the tissue is on every slice)."
            + _pooled_state(shown, "area_agreement"),
        ),
        Image(
            "area_agreement",
            figures.area_agreement_figure(area_rows, TISSUES),
            "Area agreement per site and pooled group." + _pooled_state(shown, "area_agreement"),
        ),
    ]
    smi_sites = {site: p for site, p in payloads.items() if p.smi is not None and p.smi.n > 0}
    smi_pools = [p for p in shown if p.smi is not None and p.smi.n > 0]
    smi_rows: dict[str, SmiAgreement] = {site: p.smi for site, p in smi_sites.items() if p.smi is not None}
    smi_rows |= {g.label: g.pooled.smi for g in groups if g.pooled in smi_pools and g.pooled.smi is not None}
    if smi_rows:
        blocks += [
            Heading("Skeletal muscle index (SMI) agreement"),
            Table(
                agreement_display(smi_table(smi_sites, smi_pools)),
                "SMI in cm²/m² over slices with a known height; test - label, per site over its slices and "
                f"per group pooled over its sites' slices. {_LIMITS}."
                + _pooled_state(smi_pools, "smi_agreement"),
            ),
            Image(
                "smi_agreement",
                figures.smi_figure(smi_rows),
                "SMI agreement per site and pooled group." + _pooled_state(smi_pools, "smi_agreement"),
            ),
        ]
    sarcopenia_pools = [p for p in shown if p.sarcopenia is not None]
    frame = sarcopenia_table(payloads, sarcopenia_pools)
    if not frame.empty:
        blocks += [
            Heading("Sarcopenia calls"),
            Table(
                for_people(frame),
                "Slices called sarcopenic by the label (truth) and by the test, cut-off set "
                f"{report.cutoff_set}; unknown = no height or sex. Counts are slices (a patient with "
                "several slices counts several times)."
                + _pooled_state(sarcopenia_pools, "sarcopenia_confusion"),
            ),
        ]
    return blocks


def build_document(report: StudyReport) -> list[Block]:
    """The report's content, independent of the output format: the title, the model in two sentences
    and the verdict table first; the seed's tables and the statistics; label conventions; the study's
    settings; engineering detail in an appendix at the end."""
    report = with_verdicts(report)
    groups = report_groups(report)
    n_usable = sum(len(g.payloads) for g in groups)
    blocks: list[Block] = [Heading(f"Study report: {report.study_name}", 1), *headline_blocks(report, groups)]
    if not groups:
        return [
            *blocks,
            Heading("Results"),
            Text("No site returned a usable result: nothing to score or pool."),
            *_study_section(report, n_usable),
            *_appendix(report),
        ]
    return [
        *blocks,
        *_glance_section(groups),
        *_scores_section(groups),
        *(_raw_protocol_section(groups) if report.task == "evaluate" else []),
        *_agreement_section(report, groups),
        *conventions_section(report),
        *_study_section(report, n_usable),
        *_appendix(report),
    ]
