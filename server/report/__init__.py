"""The study report: report.json, the seed's tables as CSV, figures, report.md and report.html.

Everything is computed from the sites' payloads (aggregates) only; the pooling itself is
``common.pooling``'s, and every pooled number says which sites it is over. The parts:

- ``groups``: internal and external sites pooled separately, never together, each group named
  with its n ("internal (held-out test patients of the sites that trained the model), 18
  slices of 16 patients at 2 sites");
- ``tables``: the tables as pandas DataFrames, one function each;
- ``glance``: internal vs external (and each site) side by side, raw vs protocol-applied bins;
- ``findings``: each site's findings with the coordinator's attribution, the model's error
  profile, the label audits, impact sentences;
- ``verdict``: each site's verdict by explicit rules (docs/REPORT.md), stored in report.json;
- ``headline``: the first screen: the model in two sentences, then the verdict table;
- ``agreement`` and ``columns``: Bland-Altman limits with their intervals, column names for people;
- ``document`` and ``conventions``: the report's sections as format-independent blocks (``blocks``),
  engineering detail (hashes, node ids, fingerprints, rounds) in an appendix at the end;
- ``render``: Markdown and self-contained HTML (inline CSS, figures as base64 PNG);
- ``sentences``: notes and the CLI's ``summary_lines``;
- ``files``: ``report_tables`` (every CSV of a study) and ``write_report``, which writes them all
  (report.json with its ``pooled`` groups).

Figures are drawn by ``server.figures``.
"""

from __future__ import annotations

from server.report.document import build_document
from server.report.files import ReportPaths, finished_report, report_tables, with_pooled, write_report
from server.report.sentences import summary_lines

__all__ = [
    "ReportPaths",
    "build_document",
    "finished_report",
    "report_tables",
    "summary_lines",
    "with_pooled",
    "write_report",
]
