"""Render the report's blocks: Markdown (figures linked) and one self-contained HTML page (inline CSS,
figures as inline SVG with real text, or base64 PNG; no external resource)."""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Mapping, Sequence

import pandas as pd

from server.report.blocks import Block, Bullets, Heading, Image, Table, Text


def format_cell(value: object) -> str:
    """A table cell for people: numbers rounded, missing values as '-'."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1 else f"{value:.2f}"
    return str(value)


def _rows(table: Table) -> tuple[list[str], list[list[str]], list[list[bool]]]:
    frame = table.frame
    header = ([frame.index.name or ""] if table.index else []) + [str(c) for c in frame.columns]
    cells, marks = [], []
    for i, (label, row) in enumerate(frame.iterrows()):
        cells.append(([str(label)] if table.index else []) + [format_cell(v) for v in row.tolist()])
        flags = [bool(v) for v in table.highlight.iloc[i].tolist()] if table.highlight is not None else []
        marks.append(([False] if table.index else []) + (flags or [False] * len(frame.columns)))
    return header, cells, marks


def render_markdown(blocks: Sequence[Block], figure_paths: Mapping[str, str]) -> str:
    """Markdown text; figures are linked by their relative paths."""
    out: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"{'#' * block.level} {block.text}\n")
        elif isinstance(block, Text):
            out.append(block.text + "\n")
        elif isinstance(block, Bullets):
            out.append("\n".join(f"- {item}" for item in block.items) + "\n")
        elif isinstance(block, Table):
            header, cells, marks = _rows(block)
            esc = [[c.replace("|", "\\|") for c in row] for row in cells]
            lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            for row, flags in zip(esc, marks, strict=True):
                lines.append(
                    "| "
                    + " | ".join(f"**{c}**" if f and c else c for c, f in zip(row, flags, strict=True))
                    + " |"
                )
            caption = f"*{block.caption}*\n\n" if block.caption else ""
            out.append(caption + "\n".join(lines) + "\n")
        else:
            out.append(f"![{block.caption}]({figure_paths[block.name]})\n\n*{block.caption}*\n")
    return "\n".join(out)


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:1200px;color:#222;
line-height:1.4;padding:0 1em}
h1{border-bottom:2px solid #444}h2{border-bottom:1px solid #bbb;margin-top:2em}
table{border-collapse:collapse;margin:.4em 0 1.2em;font-size:.85em}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right;vertical-align:top}
th{background:#eee}td:first-child,th:first-child{text-align:left}
caption{caption-side:top;text-align:left;font-style:italic;padding-bottom:.3em;color:#444}
td.sys{background:#fdd0a2;font-weight:bold;outline:2px solid #08306b}
figure{margin:1em 0;max-width:100%}figcaption{font-style:italic;color:#444}
figure img,figure svg{display:block;max-width:100%;height:auto}
.table-wrap{overflow-x:auto}
#verdict td,#verdict th{text-align:left}#verdict td:first-child{white-space:nowrap}
"""


#: What precedes a matplotlib SVG's <svg> element (XML declaration, doctype) and its metadata.
_SVG_PROLOG = re.compile(r"\A.*?(?=<svg\b)", re.S)
_SVG_METADATA = re.compile(r"<metadata>.*?</metadata>\s*", re.S)
#: Namespace declarations: an HTML page's parser knows SVG's (and a page stays free of URLs).
_SVG_XMLNS = re.compile(r'\s+xmlns(:\w+)?="[^"]*"')
#: An id, or a reference to one (``url(#id)``, ``href="#id"``).
_SVG_ID = re.compile(r'(\bid="|url\(#|href="#)([^")]+)')


def inline_svg(svg: str, prefix: str) -> str:
    """An SVG document as an element for an HTML page: prolog and metadata dropped, every id (and
    each reference to one) prefixed so that several figures on one page cannot collide."""
    element = _SVG_METADATA.sub("", _SVG_PROLOG.sub("", svg, count=1))
    head, _, rest = element.partition(">")
    element = _SVG_XMLNS.sub("", head) + ">" + rest
    return _SVG_ID.sub(lambda m: f"{m.group(1)}{prefix}-{m.group(2)}", element)


def _figure_html(block: Image) -> str:
    """A figure: its SVG inline (text the browser draws at the page's scale) when the block's PNG
    carries one (``server.figures.Drawing``), else the PNG as a data URI."""
    caption = html.escape(block.caption)
    svg: str | None = getattr(block.png, "svg", None)
    if svg:
        slug = re.sub(r"[^A-Za-z0-9_-]", "-", block.name)
        drawing = inline_svg(svg, f"fig-{slug}").replace(
            "<svg ", f'<svg role="img" aria-label="{caption}" ', 1
        )
        return f'<figure id="figure-{slug}">{drawing}<figcaption>{caption}</figcaption></figure>'
    data = base64.b64encode(block.png).decode("ascii")
    image = f'<img alt="{caption}" src="data:image/png;base64,{data}">'
    return f"<figure>{image}<figcaption>{caption}</figcaption></figure>"


def render_html(blocks: Sequence[Block], title: str) -> str:
    """One self-contained HTML page: inline CSS, figures as inline SVG (or base64 PNG), no external
    resource."""
    esc = html.escape
    body: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            body.append(f"<h{block.level}>{esc(block.text)}</h{block.level}>")
        elif isinstance(block, Text):
            body.append(f"<p>{esc(block.text)}</p>")
        elif isinstance(block, Bullets):
            body.append("<ul>" + "".join(f"<li>{esc(item)}</li>" for item in block.items) + "</ul>")
        elif isinstance(block, Table):
            header, cells, marks = _rows(block)
            head = "".join(f"<th>{esc(h)}</th>" for h in header)
            rows = "".join(
                "<tr>"
                + "".join(
                    f'<td class="sys">{esc(c)}</td>' if f else f"<td>{esc(c)}</td>"
                    for c, f in zip(row, flags, strict=True)
                )
                + "</tr>"
                for row, flags in zip(cells, marks, strict=True)
            )
            caption = f"<caption>{esc(block.caption)}</caption>" if block.caption else ""
            table = f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
            anchor = f' id="{esc(block.id)}"' if block.id else ""
            body.append(f'<div class="table-wrap"{anchor}>{table}</div>')
        else:
            body.append(_figure_html(block))
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)}</title><style>{_CSS}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
