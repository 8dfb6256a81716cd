"""The study report: report.json, the seed's tables as CSV, figures, report.md and report.html.

Everything is computed from the sites' payloads (aggregates) only; the pooling itself is
``common.pooling``'s, and every pooled number says which sites it is over. The parts:

- ``tables``: the tables as pandas DataFrames (``report_tables``: every CSV of a study);
- ``document``: the report's sections as format-independent blocks (``blocks``);
- ``render``: Markdown and self-contained HTML (inline CSS, figures as base64 PNG);
- ``sentences``: notes, findings' impact and attribution, the CLI's ``summary_lines``;
- ``files``: ``write_report`` writes them all (report.json with its ``pooled`` results).

Figures are drawn by ``server.figures``.
"""

from __future__ import annotations

from server.report.document import build_document
from server.report.files import ReportPaths, with_pooled, write_report
from server.report.sentences import summary_lines
from server.report.tables import report_tables

__all__ = ["ReportPaths", "build_document", "report_tables", "summary_lines", "with_pooled", "write_report"]
