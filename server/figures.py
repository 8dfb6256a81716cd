"""Figures of the study report, drawn from aggregates only (matplotlib, Agg, no pyplot state).

Every function returns a :class:`Drawing`: PNG bytes (``figures/*.png`` beside ``report.md``)
that also carry the same figure as SVG with real text (``report.html`` embeds it inline, so the
browser draws the words at the page's scale). Figures never see a per-slice value: a
Bland-Altman panel shows each site's mean difference with its limits of agreement, not a cloud
of slices.

Readable as rendered: every text is at least :data:`SMALL_PT` (11 pt = 14.7 px at the SVG's
natural size, close to the page's 16 px body text) and each figure is sized from what it shows
(labels, sites, findings) to at most :data:`MAX_WIDTH_IN` wide, so the page (1200 px wide)
never shrinks it. Colours are Okabe-Ito (safe for red-green colour blindness); ordered bins
run blue (best) to vermillion (worst).
"""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.rcsetup import cycler
from matplotlib.ticker import PercentFormatter
from matplotlib.typing import RcKeyType

from common.pooling import has_bins
from common.stats import wilson_interval
from protocols.classes import IOU_BINS, SEED_COLUMN
from protocols.findings import Attribution
from protocols.payloads import AreaAgreement, ClassScores, PolarMap, SmiAgreement
from protocols.report import RoundRecord

#: Okabe & Ito (2008), the palette safe for every common colour-vision deficiency.
OKABE_ITO: dict[str, str] = {
    "black": "#000000",
    "orange": "#E69F00",
    "sky blue": "#56B4E9",
    "bluish green": "#009E73",
    "yellow": "#F0E442",
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "reddish purple": "#CC79A7",
}
#: Bin colours, best to worst: two blues, then orange and vermillion (no red-green pair).
BIN_COLOURS: dict[str, str] = {
    "[0.9,1.0]": OKABE_ITO["blue"],
    "[0.8,0.9)": OKABE_ITO["sky blue"],
    "[0.7,0.8)": OKABE_ITO["orange"],
    "[0,0.7)": OKABE_ITO["vermillion"],
}
TISSUE_TEXT: dict[str, str] = {
    "muscle": "muscle",
    "subcutaneous_fat": "subcutaneous fat",
    "visceral_fat": "visceral fat",
    "msv": "all three",
}
#: Groups side by side (internal, external, sites without a role): Okabe-Ito blue, orange, green,
#: with a hatch on the second so that print in grey still tells them apart.
GROUP_STYLE: tuple[tuple[str, str], ...] = (
    (OKABE_ITO["blue"], ""),
    (OKABE_ITO["orange"], "//"),
    (OKABE_ITO["bluish green"], ".."),
)
#: Lines of a line chart (one per site), in order: Okabe-Ito without black (the pooled line's).
LINE_COLOURS: tuple[str, ...] = tuple(c for name, c in OKABE_ITO.items() if name not in ("black", "yellow"))
#: How a finding is framed in the findings matrix (colour, line style), and its cell word, by its
#: attribution (None: not attributed, e.g. a comparison of label sets).
LineStyle = Literal["solid", "dashed", "dotted"]
ATTRIBUTION_STYLE: dict[Attribution | None, tuple[str, LineStyle, str]] = {
    "site_convention": ("#000000", "solid", "site"),
    "model": ("#0072B2", "dashed", "model"),
    "undetermined": ("#666666", "dotted", "?"),
    None: ("#08306b", "solid", ""),
}
#: Sequential maps (lightness-coded, so they read without hue): findings prevalence, polar areas.
PREVALENCE_CMAP = "Oranges"
POLAR_CMAP = "Purples"

#: Smallest text in any figure (tick labels, annotations, legends), and titles, in points. At the
#: SVG's natural size 1 pt = 4/3 px: 11 pt is 14.7 px, the page's body text is 16 px.
SMALL_PT = 11.0
TITLE_PT = 12.0
#: Widest figure, in inches (96 px each at natural size): the page's content is 1200 px wide.
MAX_WIDTH_IN = 11.5
_DPI = 110
#: Mean advance of a DejaVu Sans character, in ems: to size a figure from its labels.
_CHAR_EM = 0.62
_RC: dict[RcKeyType, Any] = {
    "font.size": SMALL_PT,
    "axes.titlesize": TITLE_PT,
    "axes.labelsize": SMALL_PT,
    "xtick.labelsize": SMALL_PT,
    "ytick.labelsize": SMALL_PT,
    "legend.fontsize": SMALL_PT,
    "figure.titlesize": TITLE_PT,
    "axes.prop_cycle": cycler(color=LINE_COLOURS),
    "svg.fonttype": "none",  # real <text> in the SVG: the browser draws it, a test can measure it
    "svg.hashsalt": "sarcofed",  # same figure, same SVG ids
}


class Drawing(bytes):
    """A figure as PNG bytes (what ``report.md`` links) that also carries its SVG text
    (what ``report.html`` embeds inline). A ``bytes`` so that a report block holds it as its PNG."""

    svg: str

    def __new__(cls, png: bytes, svg: str) -> Drawing:
        drawing = super().__new__(cls, png)
        drawing.svg = svg
        return drawing


def _text_width_in(text: str, points: float = SMALL_PT) -> float:
    """Approximate width of the longest line of ``text`` at ``points``, in inches."""
    longest = max((len(line) for line in text.split("\n")), default=0)
    return longest * _CHAR_EM * points / 72.0


def _wrap(label: str, width: int = 20) -> str:
    """A label on lines of at most ``width`` characters (existing line breaks kept)."""
    return "\n".join(
        textwrap.fill(part, width, break_on_hyphens=False, break_long_words=False)
        for part in label.split("\n")
    )


def render(fig: Figure) -> Drawing:
    """Render a figure to PNG and SVG (text kept as text)."""
    FigureCanvasAgg(fig)
    with matplotlib.rc_context(_RC):
        png, svg = io.BytesIO(), io.StringIO()
        fig.savefig(png, format="png", dpi=_DPI, bbox_inches="tight")
        fig.savefig(svg, format="svg", bbox_inches="tight", metadata={"Date": None})
    return Drawing(png.getvalue(), svg.getvalue())


def to_png(fig: Figure) -> bytes:
    """Render a figure to PNG bytes."""
    return bytes(render(fig))


@matplotlib.rc_context(_RC)
def iou_bins_figure(columns: Mapping[str, Mapping[str, ClassScores]], classes: Sequence[str]) -> Drawing:
    """Stacked horizontal bars: share of defined slices per IoU bin, one panel per class (two per
    row), one bar per column, labelled on the left; the slice count is written after each bar.

    ``columns`` maps a bar label (a site, "pooled", "site (harmonised)") to its scores by class.
    Horizontal bars take any number of sites and any label length without rotating a word.
    """
    labels = [_wrap(lab) for lab in columns]
    keys = list(columns)
    ncols = min(2, len(classes))
    nrows = math.ceil(len(classes) / ncols)
    lines = max((lab.count("\n") + 1 for lab in labels), default=1)
    bar_in = max(0.42, 0.22 * lines + 0.12)
    label_in = max((_text_width_in(lab) for lab in labels), default=1.0) + 0.3
    panel_in = min(4.2, (MAX_WIDTH_IN - label_in - 0.6 * ncols) / ncols)
    fig = Figure(
        figsize=(label_in + ncols * (panel_in + 0.6), nrows * (bar_in * len(keys) + 0.9) + 0.7),
        layout="constrained",
    )
    axes = fig.subplots(nrows, ncols, sharey=True, squeeze=False).ravel()
    y = np.arange(len(keys))
    for ax in axes[len(classes) :]:
        ax.set_visible(False)
    for ax, cls in zip(axes[: len(classes)], classes, strict=True):
        left = np.zeros(len(keys))
        totals = np.array([sum(columns[k][cls].bins.values()) if cls in columns[k] else 0 for k in keys])
        for name in IOU_BINS:
            counts = np.array([columns[k][cls].bins.get(name, 0) if cls in columns[k] else 0 for k in keys])
            share = np.divide(counts, totals, out=np.zeros(len(keys)), where=totals > 0)
            ax.barh(y, share, left=left, color=BIN_COLOURS[name], label=f"IoU {name}", height=0.7)
            left += share
        for yi, total in zip(y, totals, strict=True):
            ax.text(1.02, yi, f"n={total}", ha="left", va="center", fontsize=SMALL_PT, clip_on=False)
        ax.set_title(f"{SEED_COLUMN.get(cls, cls)} ({TISSUE_TEXT.get(cls, cls)})", fontsize=TITLE_PT)
        ax.set_yticks(y, labels, fontsize=SMALL_PT)
        ax.set_xlim(0.0, 1.0)
        ax.set_ylim(len(keys) - 0.5, -0.5)  # first column on top
        ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        ax.set_xticks([0.0, 0.5, 1.0])
        ax.tick_params(axis="x", labelsize=SMALL_PT)
    for ax in axes[-ncols:]:
        if ax.get_visible():
            ax.set_xlabel("share of slices where the class is defined", fontsize=SMALL_PT)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside upper center", ncols=len(names), fontsize=SMALL_PT, frameon=False)
    return render(fig)


def _agreement_panel(
    ax: object, rows: Sequence[tuple[str, int, float | None, float | None]], unit: str, title: str
) -> None:
    """Mean difference (dot) and limits of agreement (bar) per row; pooled row drawn in black."""
    ys = np.arange(len(rows))[::-1]
    for y, (label, _n, mean, sd) in zip(ys, rows, strict=True):
        colour = "black" if label.startswith("pooled") else OKABE_ITO["blue"]
        if mean is None:
            ax.text(0.0, y, "no slice", va="center", ha="center", fontsize=SMALL_PT, color="#555555")  # type: ignore[attr-defined]
            continue
        if sd is not None:
            ax.errorbar(mean, y, xerr=1.96 * sd, fmt="none", ecolor=colour, capsize=4, lw=1.4)  # type: ignore[attr-defined]
        ax.plot(mean, y, "o", color=colour, ms=6)  # type: ignore[attr-defined]
    ax.axvline(0.0, color="grey", lw=0.8, ls="--")  # type: ignore[attr-defined]
    ax.set_yticks(ys, [_agreement_label(label, n) for label, n, _, _ in rows], fontsize=SMALL_PT)  # type: ignore[attr-defined]
    ax.set_ylim(-0.7, len(rows) - 0.3)  # type: ignore[attr-defined]
    ax.set_xlabel(f"test - label ({unit})", fontsize=SMALL_PT)  # type: ignore[attr-defined]
    ax.set_title(title, fontsize=TITLE_PT)  # type: ignore[attr-defined]
    ax.tick_params(axis="x", labelsize=SMALL_PT)  # type: ignore[attr-defined]


def _agreement_label(label: str, n: int) -> str:
    return f"{label} (n={n})"


def _agreement_size(labels: Sequence[str], panels: int, panel_in: float) -> tuple[float, float]:
    label_in = max((_text_width_in(lab) for lab in labels), default=1.0) + 0.3
    width = min(MAX_WIDTH_IN, label_in + panels * panel_in)
    return width, 1.5 + 0.42 * max(len(labels), 2)


@matplotlib.rc_context(_RC)
def area_agreement_figure(rows: Mapping[str, Mapping[str, AreaAgreement]], tissues: Sequence[str]) -> Drawing:
    """Bland-Altman from aggregates: per row (site or "pooled") mean area difference and mean +- 1.96 sd."""
    labels = [_agreement_label(label, 10_000) for label in rows]
    fig = Figure(figsize=_agreement_size(labels, len(tissues), 2.9), layout="constrained")
    axes = fig.subplots(1, len(tissues), sharey=True, squeeze=False)[0]
    for ax, tissue in zip(axes, tissues, strict=True):
        data = []
        for label, areas in rows.items():
            a = areas.get(tissue)
            data.append(
                (label, a.n if a else 0, a.mean_diff_cm2 if a else None, a.sd_diff_cm2 if a else None)
            )
        _agreement_panel(ax, data, "cm²", TISSUE_TEXT[tissue])
        if ax is not axes[0]:
            ax.tick_params(axis="y", left=False)
    fig.suptitle(
        "Area agreement: mean difference and limits of agreement (mean ± 1.96 sd)", fontsize=TITLE_PT
    )
    return render(fig)


@matplotlib.rc_context(_RC)
def smi_figure(rows: Mapping[str, SmiAgreement]) -> Drawing:
    """SMI agreement per site and pooled: mean difference and limits of agreement (cm²/m²)."""
    labels = [_agreement_label(label, 10_000) for label in rows]
    fig = Figure(figsize=_agreement_size(labels, 1, 4.0), layout="constrained")
    ax = fig.add_subplot()
    data = [(label, s.n, s.mean_diff, s.sd_diff) for label, s in rows.items()]
    _agreement_panel(ax, data, "cm²/m²", "SMI agreement (mean ± 1.96 sd)")
    return render(fig)


def finding_label(key: str) -> str:
    """``muscle/site_includes/psoas`` -> ``muscle: site includes psoas`` (a findings matrix row)."""
    cls, _, rest = key.partition("/")
    direction, _, region = rest.partition("/")
    words = " ".join(part.replace("_", " ") for part in (direction, region) if part)
    return f"{TISSUE_TEXT.get(cls, cls.replace('_', ' '))}: {words}" if words else key.replace("_", " ")


def _matrix_width(rows: Sequence[str], cell_in: float, n_sites: int, bar_below: bool) -> float:
    """Inches a findings matrix needs: finding labels, a cell per site, the colour bar (right or below)."""
    labels_in = max((_text_width_in(r) for r in rows), default=1.0) + 0.3
    return labels_in + cell_in * n_sites + (0.3 if bar_below else 1.3)


@matplotlib.rc_context(_RC)
def findings_matrix_figure(
    prevalence: np.ndarray,
    systematic: np.ndarray,
    sites: Sequence[str],
    columns: Sequence[str],
    attribution: np.ndarray | None = None,
    attribution_text: Mapping[Attribution | None, str] | None = None,
) -> Drawing:
    """Findings x sites heat map of prevalence (NaN = not reported): a row per finding, a column per site.

    The arrays are sites x findings (``prevalence[i, j]``: site i, finding j); the figure shows
    them transposed, so that each finding's label reads on one horizontal line however many
    findings there are, and the figure grows by a row per finding. Site labels are wrapped, and
    set vertically when the sites would not fit :data:`MAX_WIDTH_IN` side by side.

    Each reported cell says its prevalence and, when ``attribution`` is given (each cell's
    ``Finding.attribution``: ``site_convention``, ``model``, ``undetermined`` or None), whose
    difference it is: "site" (a label convention of the site, solid black frame), "model"
    (dashed blue frame) or "?" (undetermined, dotted grey frame). A frame marks a systematic
    finding (consistent across slices). The legend names each attribution with
    ``attribution_text`` (the report's words), or the attribution itself.
    """
    rows = [finding_label(c) for c in columns]
    heads = [_wrap(s.replace(" (", "\n("), 16) for s in sites]
    head_in = max((_text_width_in(h) for h in heads), default=0.5)
    # Roomy: sites side by side, one-line cells ("100%* model"), colour bar on the right. Crowded:
    # site names set vertically, two-line cells; then finding labels wrapped, colour bar below.
    vertical, bar_below = False, False
    cell_in = max(1.15, head_in + 0.2)
    if _matrix_width(rows, cell_in, len(sites), bar_below) > MAX_WIDTH_IN:
        vertical, cell_in = True, 0.62
        heads = list(sites)  # one line each: wrapped lines would stand side by side once turned
        head_in = max((_text_width_in(h) for h in heads), default=0.5)
    if _matrix_width(rows, cell_in, len(sites), bar_below) > MAX_WIDTH_IN:
        rows, bar_below = [_wrap(r, 28) for r in rows], True
    top_in = (head_in if vertical else max(h.count("\n") + 1 for h in heads) * SMALL_PT * 1.25 / 72) + 0.3
    width = min(MAX_WIDTH_IN, _matrix_width(rows, cell_in, len(sites), bar_below))
    height = (
        0.55 * len(rows)
        + top_in
        + 0.6
        + (0.5 if attribution is not None else 0.0)
        + (0.9 if bar_below else 0.0)
    )
    fig = Figure(figsize=(width, height), layout="constrained")
    ax = fig.add_subplot()
    shown = np.ma.masked_invalid(np.asarray(prevalence, dtype=float).T)
    image = ax.imshow(shown, cmap=PREVALENCE_CMAP, vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_facecolor("#f0f0f0")
    used: set[Attribution | None] = set()
    for i in range(len(sites)):
        for j in range(len(columns)):
            value = prevalence[i, j]
            if math.isnan(value):
                continue
            who: Attribution | None = attribution[i, j] if attribution is not None else None
            colour, style, word = ATTRIBUTION_STYLE[who]
            mark = f"{value:.0%}" + ("*" if systematic[i, j] else "")
            text = mark + (("\n" if vertical else " ") + word if word else "")
            ax.text(
                i,
                j,
                text,
                ha="center",
                va="center",
                fontsize=SMALL_PT,
                color="white" if value > 0.6 else "black",
            )
            if systematic[i, j] or attribution is not None:
                used.add(who)
                ax.add_patch(
                    Rectangle(
                        (i - 0.46, j - 0.44),
                        0.92,
                        0.88,
                        fill=False,
                        edgecolor=colour,
                        linestyle=style,
                        linewidth=2.4 if systematic[i, j] else 1.0,
                    )
                )
    ax.xaxis.tick_top()
    ax.set_xticks(np.arange(len(sites)), heads, fontsize=SMALL_PT, rotation=90 if vertical else 0)
    ax.set_yticks(np.arange(len(rows)), rows, fontsize=SMALL_PT)
    ax.tick_params(length=0)
    ax.set_title("Findings: share of slices (* and thick frame = systematic)", fontsize=TITLE_PT)
    if bar_below:
        bar = fig.colorbar(image, ax=ax, location="bottom", shrink=0.6, aspect=30)
    else:
        bar = fig.colorbar(image, ax=ax, shrink=min(0.9, 4.0 / height))
    bar.set_label("share of slices", fontsize=SMALL_PT)
    bar.ax.tick_params(labelsize=SMALL_PT)
    if attribution is not None and used:
        names = attribution_text or {}
        handles = [
            Line2D(
                [],
                [],
                color=colour,
                linestyle=style,
                lw=2,
                label=names.get(w, w or "not attributed"),
            )
            for w, (colour, style, _) in ATTRIBUTION_STYLE.items()
            if w in used
        ]
        fig.legend(
            handles=handles,
            loc="outside lower center",
            ncols=min(len(handles), 2),
            fontsize=SMALL_PT,
            frameon=False,
        )
    return render(fig)


@matplotlib.rc_context(_RC)
def internal_external_figure(
    groups: Mapping[str, Mapping[str, ClassScores]], classes: Sequence[str] = ("muscle", "msv")
) -> Drawing:
    """Grouped bars: share of defined slices per IoU bin, one bar per group (internal, external) side
    by side in each bin, one panel per class; whiskers = 95% Wilson interval, share written above.

    ``groups`` maps a legend label ("internal: 18 slices of 16 patients at 2 sites") to the
    group's pooled scores by class. A class whose bins a group did not send is left out of it.
    """
    labels = list(groups)
    width = 0.8 / max(len(labels), 1)
    x = np.arange(len(IOU_BINS))
    fig = Figure(figsize=(min(MAX_WIDTH_IN, 4.9 * len(classes) + 0.6), 4.6), layout="constrained")
    axes = fig.subplots(1, len(classes), sharey=True, squeeze=False)[0]
    for ax, cls in zip(axes, classes, strict=True):
        for g, label in enumerate(labels):
            scores = groups[label].get(cls)
            if scores is None or not has_bins(scores):
                continue
            n = sum(scores.bins[b] for b in IOU_BINS)
            shares = np.array([scores.bins[b] / n if n else 0.0 for b in IOU_BINS])
            bounds = [wilson_interval(scores.bins[b], n) for b in IOU_BINS]
            err = np.array(
                [
                    [s - lo for s, (lo, _) in zip(shares, bounds, strict=True)],
                    [hi - s for s, (_, hi) in zip(shares, bounds, strict=True)],
                ]
            )
            colour, hatch = GROUP_STYLE[g % len(GROUP_STYLE)]
            xs = x - 0.4 + width * (g + 0.5)
            ax.bar(xs, shares, width=width * 0.95, color=colour, hatch=hatch, edgecolor="white", label=label)
            ax.errorbar(xs, shares, yerr=np.clip(err, 0.0, None), fmt="none", ecolor="black", capsize=3, lw=1)
            for xi, share, (_, hi) in zip(xs, shares, bounds, strict=True):
                ax.text(xi, hi + 0.02, f"{share:.0%}", ha="center", va="bottom", fontsize=SMALL_PT)
        ax.set_xticks(x, list(IOU_BINS), fontsize=SMALL_PT)
        ax.set_xlabel("IoU bin", fontsize=SMALL_PT)
        ax.set_title(f"{SEED_COLUMN.get(cls, cls)} ({TISSUE_TEXT.get(cls, cls)})", fontsize=TITLE_PT)
        ax.set_ylim(0.0, 1.15)
        ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        ax.tick_params(axis="y", labelsize=SMALL_PT)
    axes[0].set_ylabel("share of slices where the class is defined", fontsize=SMALL_PT)
    handles = [
        Patch(
            facecolor=GROUP_STYLE[g % len(GROUP_STYLE)][0],
            hatch=GROUP_STYLE[g % len(GROUP_STYLE)][1],
            edgecolor="white",
            label=label,
        )
        for g, label in enumerate(labels)
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=1, fontsize=SMALL_PT, frameon=False)
    return render(fig)


#: Polar panels per row, and each panel's size (inches): three across still show a region clearly.
POLAR_COLUMNS = 3
POLAR_PANEL_IN = 3.0


@matplotlib.rc_context(_RC)
def polar_maps_figure(maps: Mapping[str, PolarMap], keys: Sequence[str]) -> Drawing:
    """Discordant area per slice (cm² summed / n_slices): a band per class:direction, each site's
    map in it (three to a row, wrapping), every panel 3 inches across.

    Angle and radius are the site's polar grid (``protocols.payloads.PolarMap``): angle bins
    cover 0..360 degrees as the site's discrepancy analysis defines them, radius is normalised
    (0 centre, 1 body outline). One colour scale for the whole figure, so a faint map stays
    faint: magnitudes compare across sites and across rows.
    """
    sites = list(maps)
    per_site = {
        (s, key): np.asarray(maps[s].maps[key], dtype=float) / max(maps[s].n_slices, 1)
        for s in sites
        for key in keys
        if key in maps[s].maps
    }
    vmax = max((float(v.max()) for v in per_site.values() if v.size), default=0.0) or 1.0
    norm = Normalize(0.0, vmax)
    ncols = max(1, min(POLAR_COLUMNS, len(sites)))
    per_key = math.ceil(len(sites) / ncols)
    nrows = per_key * len(keys)
    height = (POLAR_PANEL_IN + 0.45) * nrows + 1.3
    fig = Figure(figsize=(POLAR_PANEL_IN * ncols + 1.0, height), layout="constrained")
    axes = fig.subplots(nrows, ncols, subplot_kw={"projection": "polar"}, squeeze=False)
    mesh = None
    for k, key in enumerate(keys):
        cls, _, direction = key.partition(":")
        band = f"{TISSUE_TEXT.get(cls, cls)}\n{direction.replace('_', ' ')}"
        for n in range(per_key * ncols):
            ax = axes[k * per_key + n // ncols, n % ncols]
            if n >= len(sites):
                ax.set_visible(False)
                continue
            site = sites[n]
            # PolarMap convention: 0 deg = anterior (drawn at the top), 90 deg = image right.
            ax.set_theta_zero_location("N")
            ax.set_theta_direction(-1)
            ax.set_xticks(np.deg2rad(np.arange(0, 360, 90)), ["anterior", "R", "posterior", "L"])
            ax.set_yticks([0.5, 1.0], ["", ""])
            ax.tick_params(labelsize=SMALL_PT, pad=1)
            ax.grid(alpha=0.4)
            ax.set_ylim(0.0, 1.0)
            if n % ncols == 0:
                ax.set_ylabel(band, fontsize=TITLE_PT, labelpad=28)
            values = per_site.get((site, key))
            if values is None or values.ndim != 2 or not values.size:
                ax.set_title(f"{_wrap(site, 30)}\n(no map)", fontsize=SMALL_PT, pad=10)
                continue
            n_angle, n_radius = values.shape
            theta = np.linspace(0.0, 2 * np.pi, n_angle + 1)
            radius = np.linspace(0.0, 1.0, n_radius + 1)
            # an image in the SVG, not a path per cell: the text stays text, the file stays small
            mesh = ax.pcolormesh(
                theta, radius, values.T, cmap=POLAR_CMAP, norm=norm, shading="flat", rasterized=True
            )
            ax.set_title(f"{_wrap(site, 30)} (n={maps[site].n_slices})", fontsize=SMALL_PT, pad=10)
    fig.suptitle("R / L = image right / left; radius 0 = centre, 1 = body outline", fontsize=SMALL_PT)
    if mesh is not None:
        bar = fig.colorbar(
            mesh, ax=axes.ravel().tolist(), location="bottom", shrink=0.5, aspect=30, fraction=0.25 / height
        )
        bar.set_label("discordant cm² per slice", fontsize=SMALL_PT)
        bar.ax.tick_params(labelsize=SMALL_PT)
    return render(fig)


@matplotlib.rc_context(_RC)
def training_figure(rounds: Sequence[RoundRecord]) -> Drawing:
    """Pooled validation loss per round (black) and each site's validation loss (thin lines)."""
    fig = Figure(figsize=(7.0, 3.8), layout="constrained")
    ax = fig.add_subplot()
    done = [(r.round, r.pooled_val_loss) for r in rounds if r.pooled_val_loss is not None]
    ax.plot([x for x, _ in done], [y for _, y in done], "o-", color="black", label="pooled")
    sites = sorted({s for r in rounds for s in r.per_site})
    for k, site in enumerate(sites):
        points = [
            (r.round, r.per_site[site]["val-loss"]) for r in rounds if "val-loss" in r.per_site.get(site, {})
        ]
        if points:
            xs, ys = zip(*points, strict=True)
            colour = LINE_COLOURS[k % len(LINE_COLOURS)]
            ax.plot(xs, ys, ".-", lw=1.0, color=colour, label=site)
    for r in rounds:
        if r.status == "failed":
            ax.axvline(r.round, color=OKABE_ITO["vermillion"], lw=1.0, ls=":")
    ax.set_xlabel("round", fontsize=SMALL_PT)
    ax.set_ylabel("validation loss\n(mean over slices)", fontsize=SMALL_PT)
    ax.tick_params(labelsize=SMALL_PT)
    if rounds:
        ax.set_xticks(sorted({r.round for r in rounds}))
    fig.legend(fontsize=SMALL_PT, frameon=False, loc="outside right upper")
    return render(fig)
