"""Write a study report's files: report.json (with the pooled groups), tables/*.csv, figures/*.png,
report.md and a self-contained report.html."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from common.pooling import pool_report
from protocols.pooled import PooledGroup, PooledReport
from protocols.report import StudyReport
from server.report.blocks import Image
from server.report.document import build_document
from server.report.findings import audit_table, findings_table
from server.report.glance import glance_table, raw_protocol_table
from server.report.groups import report_groups
from server.report.render import render_html, render_markdown
from server.report.tables import (
    BINS_STEM,
    area_table,
    bins_stem,
    file_stem,
    harmonised_table,
    iou_summary_table,
    pooled_seed_table,
    sarcopenia_table,
    seed_table,
    sites_table,
    smi_table,
    table_coverage,
    training_table,
)
from server.report.verdict import with_verdicts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReportPaths:
    """Where :func:`write_report` put everything."""

    root: Path
    json: Path
    markdown: Path
    html: Path
    tables: dict[str, Path]
    figures: dict[str, Path]


def with_pooled(report: StudyReport) -> StudyReport:
    """The report with ``pooled`` filled from its sites' payloads: one group per role, internal and
    external apart (None when no site is usable).

    Pooled results are always recomputed: the payloads are the record, ``pooled`` is what
    the report made of them.
    """
    groups = [PooledGroup.of(results, table_coverage(results)) for results in pool_report(report)]
    return report.model_copy(update={"pooled": PooledReport(groups=groups) if groups else None})


def finished_report(report: StudyReport) -> StudyReport:
    """What the report makes of the sites' payloads, added to them: the pooled groups and each site's
    verdict (both recomputed). This is what ``report.json`` holds."""
    return with_verdicts(with_pooled(report))


def report_tables(report: StudyReport) -> dict[str, pd.DataFrame]:
    """The CSV tables by file stem (``tables/<stem>.csv``): machine column names, a ``role`` column
    and one pooled row (or file) per group; the sites table with each site's verdict."""
    report = with_verdicts(report)
    groups = report_groups(report)
    tables: dict[str, pd.DataFrame] = {"sites": sites_table(report)}
    if report.training:
        tables["training_rounds"] = training_table(report.training)
    if not groups:
        return tables
    payloads = {site: p for g in groups for site, p in g.payloads.items()}
    pools = [g.pooled for g in groups]
    tables["internal_external"] = glance_table(groups)
    taken: set[str] = set()
    for site, p in payloads.items():
        tables[f"{file_stem(site, taken)}_{BINS_STEM}"] = seed_table(p.scores, p.n_used)
    for g in groups:
        tables[bins_stem(g.role)] = pooled_seed_table(g.pooled)
    tables["iou_summary"] = iou_summary_table(payloads, pools)
    tables["area_agreement"] = area_table(payloads, pools)
    tables["smi_agreement"] = smi_table(payloads, pools)
    tables["sarcopenia_confusion"] = sarcopenia_table(payloads, pools)
    optional = {
        "raw_vs_protocol_bins": raw_protocol_table(groups),
        "findings": findings_table(report),
        "label_audit": audit_table(report),
    }
    tables |= {stem: frame for stem, frame in optional.items() if not frame.empty}
    harmonised = [
        harmonised_table(p.scores, p.harmonised_scores).reset_index().assign(site=site)
        for site, p in payloads.items()
        if p.harmonised_scores
    ]
    if harmonised:
        tables["harmonised_muscle_bins"] = pd.concat(harmonised, ignore_index=True)
    return tables


def write_report(report: StudyReport, out_dir: Path) -> ReportPaths:
    """Write report.json, tables/*.csv, figures/*.png, report.md and report.html into ``out_dir``."""
    out_dir = Path(out_dir)
    (out_dir / "tables").mkdir(parents=True, exist_ok=True)
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    report = finished_report(report)
    json_path = out_dir / "report.json"
    json_path.write_text(report.model_dump_json(indent=2), encoding="utf-8")
    table_paths = {}
    for stem, frame in report_tables(report).items():
        path = out_dir / "tables" / f"{stem}.csv"
        frame.to_csv(path, index=frame.index.name is not None)
        table_paths[stem] = path
    blocks = build_document(report)
    figure_paths = {}
    for block in blocks:
        if isinstance(block, Image):
            path = out_dir / "figures" / f"{block.name}.png"
            path.write_bytes(block.png)
            figure_paths[block.name] = path
    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    md_path.write_text(
        render_markdown(blocks, {k: v.relative_to(out_dir).as_posix() for k, v in figure_paths.items()}),
        encoding="utf-8",
    )
    html_path.write_text(render_html(blocks, f"sarcofed study report: {report.study_name}"), encoding="utf-8")
    log.info("study report written to %s", out_dir)
    return ReportPaths(out_dir, json_path, md_path, html_path, table_paths, figure_paths)
