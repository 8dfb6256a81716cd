"""Write a study report's files: report.json (with the pooled results), tables/*.csv, figures/*.png,
report.md and a self-contained report.html."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from common.pooling import pool_report
from protocols.pooled import PooledReport
from protocols.report import StudyReport
from server.report.blocks import Image
from server.report.document import build_document
from server.report.render import render_html, render_markdown
from server.report.tables import report_tables, table_coverage

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
    """The report with ``pooled`` filled from its sites' payloads (None when no site is usable).

    Pooled results are always recomputed: the payloads are the record, ``pooled`` is what
    the report made of them.
    """
    results = pool_report(report)
    pooled = PooledReport(results=results, tables=table_coverage(results)) if results else None
    return report.model_copy(update={"pooled": pooled})


def write_report(report: StudyReport, out_dir: Path) -> ReportPaths:
    """Write report.json, tables/*.csv, figures/*.png, report.md and report.html into ``out_dir``."""
    out_dir = Path(out_dir)
    (out_dir / "tables").mkdir(parents=True, exist_ok=True)
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    report = with_pooled(report)
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
