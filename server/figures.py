"""Figures of the study report, drawn from aggregates only (matplotlib, Agg, no pyplot state).

Every function returns PNG bytes; ``server.report.document`` puts them in the report, which
embeds them in ``report.html`` and writes them beside ``report.md``. Figures never see a
per-slice value: a Bland-Altman panel shows each site's mean difference with its limits of
agreement, not a cloud of slices.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import PercentFormatter

from common.pooling import has_bins
from common.stats import wilson_interval
from protocols.classes import IOU_BINS, SEED_COLUMN
from protocols.findings import Attribution
from protocols.payloads import AreaAgreement, ClassScores, PolarMap, SmiAgreement
from protocols.report import RoundRecord

#: Bin colours, best (green) to worst (red); colour-blind safe enough with the hatching-free order.
BIN_COLOURS: dict[str, str] = {
    "[0.9,1.0]": "#1a9850",
    "[0.8,0.9)": "#a6d96a",
    "[0.7,0.8)": "#fdae61",
    "[0,0.7)": "#d73027",
}
TISSUE_TEXT: dict[str, str] = {
    "muscle": "muscle",
    "subcutaneous_fat": "subcutaneous fat",
    "visceral_fat": "visceral fat",
    "msv": "all three",
}
#: Groups side by side (internal, external, sites without a role): Okabe-Ito blue, orange, green,
#: with a hatch on the second so that print in grey still tells them apart.
GROUP_STYLE: tuple[tuple[str, str], ...] = (("#0072B2", ""), ("#E69F00", "//"), ("#009E73", ".."))
#: How a finding is framed in the findings matrix (colour, line style), and its cell word, by its
#: attribution (None: not attributed, e.g. a comparison of label sets).
LineStyle = Literal["solid", "dashed", "dotted"]
ATTRIBUTION_STYLE: dict[Attribution | None, tuple[str, LineStyle, str]] = {
    "site_convention": ("#000000", "solid", "site"),
    "model": ("#0072B2", "dashed", "model"),
    "undetermined": ("#666666", "dotted", "?"),
    None: ("#08306b", "solid", ""),
}
_DPI = 110


def to_png(fig: Figure) -> bytes:
    """Render a figure to PNG bytes."""
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI, bbox_inches="tight")
    return buffer.getvalue()


def iou_bins_figure(columns: Mapping[str, Mapping[str, ClassScores]], classes: Sequence[str]) -> bytes:
    """Stacked bars: share of defined slices per IoU bin, one panel per class, one bar per column.

    ``columns`` maps a bar label (a site, "pooled", "site (harmonised)") to its scores by class.
    The slice count is written above each bar.
    """
    labels = list(columns)
    panel = max(1.8, 0.85 * len(labels) + 0.4)
    rotation = 0 if all(len(part) <= 10 for lab in labels for part in lab.split("\n")) else 30
    ncols = len(classes) if len(labels) <= 4 else min(2, len(classes))  # many sites: a 2 x 2 grid
    nrows = math.ceil(len(classes) / ncols)
    fig = Figure(figsize=(panel * ncols + 2.2, 3.6 * nrows + (0.6 if rotation else 0)), layout="constrained")
    axes = fig.subplots(nrows, ncols, sharey=True, squeeze=False).ravel()
    x = np.arange(len(labels))
    for ax in axes[len(classes) :]:
        ax.set_visible(False)
    for ax, cls in zip(axes[: len(classes)], classes, strict=True):
        bottom = np.zeros(len(labels))
        totals = np.array(
            [sum(columns[lab][cls].bins.values()) if cls in columns[lab] else 0 for lab in labels]
        )
        for name in IOU_BINS:
            counts = np.array(
                [columns[lab][cls].bins.get(name, 0) if cls in columns[lab] else 0 for lab in labels]
            )
            share = np.divide(counts, totals, out=np.zeros(len(labels)), where=totals > 0)
            ax.bar(x, share, bottom=bottom, color=BIN_COLOURS[name], label=f"IoU {name}", width=0.7)
            bottom += share
        for xi, total in zip(x, totals, strict=True):
            ax.text(xi, 1.01, f"n={total}", ha="center", va="bottom", fontsize=7)
        ax.set_title(f"{SEED_COLUMN.get(cls, cls)} ({TISSUE_TEXT.get(cls, cls)})", fontsize=9, pad=14)
        ax.set_xticks(x, labels, rotation=rotation, ha="right" if rotation else "center", fontsize=8)
        ax.set_ylim(0, 1.0)
        ax.tick_params(axis="y", labelsize=8)
    for ax in axes[::ncols]:
        ax.set_ylabel("share of slices where the class is defined", fontsize=8)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside right center", fontsize=8, frameon=False)
    return to_png(fig)


def _agreement_panel(
    ax: object, rows: Sequence[tuple[str, int, float | None, float | None]], unit: str, title: str
) -> None:
    """Mean difference (dot) and limits of agreement (bar) per row; pooled row drawn in black."""
    ys = np.arange(len(rows))[::-1]
    for y, (label, _n, mean, sd) in zip(ys, rows, strict=True):
        colour = "black" if label == "pooled" else "#2166ac"
        if mean is None:
            ax.text(0.0, y, "no slice", va="center", ha="center", fontsize=7, color="grey")  # type: ignore[attr-defined]
            continue
        if sd is not None:
            ax.errorbar(mean, y, xerr=1.96 * sd, fmt="none", ecolor=colour, capsize=4, lw=1.2)  # type: ignore[attr-defined]
        ax.plot(mean, y, "o", color=colour, ms=5)  # type: ignore[attr-defined]
    ax.axvline(0.0, color="grey", lw=0.8, ls="--")  # type: ignore[attr-defined]
    ax.set_yticks(ys, [f"{label} (n={n})" for label, n, _, _ in rows], fontsize=8)  # type: ignore[attr-defined]
    ax.set_ylim(-0.7, len(rows) - 0.3)  # type: ignore[attr-defined]
    ax.set_xlabel(f"test - label ({unit})", fontsize=8)  # type: ignore[attr-defined]
    ax.set_title(title, fontsize=9)  # type: ignore[attr-defined]
    ax.tick_params(axis="x", labelsize=8)  # type: ignore[attr-defined]


def area_agreement_figure(rows: Mapping[str, Mapping[str, AreaAgreement]], tissues: Sequence[str]) -> bytes:
    """Bland-Altman from aggregates: per row (site or "pooled") mean area difference and mean +- 1.96 sd."""
    fig = Figure(figsize=(3.4 * len(tissues), 1.0 + 0.45 * max(len(rows), 2)), layout="constrained")
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
    fig.suptitle("Area agreement: mean difference and limits of agreement (mean ± 1.96 sd)", fontsize=9)
    return to_png(fig)


def smi_figure(rows: Mapping[str, SmiAgreement]) -> bytes:
    """SMI agreement per site and pooled: mean difference and limits of agreement (cm²/m²)."""
    fig = Figure(figsize=(4.6, 1.0 + 0.45 * max(len(rows), 2)), layout="constrained")
    ax = fig.add_subplot()
    data = [(label, s.n, s.mean_diff, s.sd_diff) for label, s in rows.items()]
    _agreement_panel(ax, data, "cm²/m²", "SMI agreement (mean ± 1.96 sd)")
    return to_png(fig)


def findings_matrix_figure(
    prevalence: np.ndarray,
    systematic: np.ndarray,
    sites: Sequence[str],
    columns: Sequence[str],
    attribution: np.ndarray | None = None,
    attribution_text: Mapping[Attribution | None, str] | None = None,
) -> bytes:
    """Sites x findings heat map of prevalence (NaN = not reported).

    Each reported cell says its prevalence and, when ``attribution`` is given (each cell's
    ``Finding.attribution``: ``site_convention``, ``model``, ``undetermined`` or None), whose
    difference it is: "site" (a label convention of the site, solid black frame), "model"
    (dashed blue frame) or "?" (undetermined, dotted grey frame). A frame marks a systematic
    finding (consistent across slices). The legend names each attribution with
    ``attribution_text`` (the report's words), or the attribution itself.
    """
    fig = Figure(figsize=(2.4 + 0.95 * len(columns), 1.9 + 0.55 * len(sites)), layout="constrained")
    ax = fig.add_subplot()
    masked = np.ma.masked_invalid(prevalence)
    image = ax.imshow(masked, cmap="Oranges", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_facecolor("#f0f0f0")
    used: set[Attribution | None] = set()
    for i in range(len(sites)):
        for j in range(len(columns)):
            value = prevalence[i, j]
            if math.isnan(value):
                continue
            who: Attribution | None = attribution[i, j] if attribution is not None else None
            colour, style, word = ATTRIBUTION_STYLE[who]
            text = f"{value:.0%}" + ("*" if systematic[i, j] else "") + (f"\n{word}" if word else "")
            ax.text(
                j, i, text, ha="center", va="center", fontsize=9, color="white" if value > 0.6 else "black"
            )
            if systematic[i, j] or attribution is not None:
                used.add(who)
                ax.add_patch(
                    Rectangle(
                        (j - 0.46, i - 0.46),
                        0.92,
                        0.92,
                        fill=False,
                        edgecolor=colour,
                        linestyle=style,
                        linewidth=2.4 if systematic[i, j] else 1.0,
                    )
                )
    ax.set_xticks(
        np.arange(len(columns)),
        [c.replace("/", "\n").replace("_", " ") for c in columns],
        fontsize=9,
        rotation=30,
        ha="right",
        rotation_mode="anchor",
    )
    ax.set_yticks(np.arange(len(sites)), list(sites), fontsize=9)
    ax.set_title("Findings: share of slices (* thick frame = systematic)", fontsize=10)
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of slices")
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
        fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=9, frameon=False)
    return to_png(fig)


def internal_external_figure(
    groups: Mapping[str, Mapping[str, ClassScores]], classes: Sequence[str] = ("muscle", "msv")
) -> bytes:
    """Grouped bars: share of defined slices per IoU bin, one bar per group (internal, external) side
    by side in each bin, one panel per class; whiskers = 95% Wilson interval, share written above.

    ``groups`` maps a legend label ("internal: 18 slices of 16 patients at 2 sites") to the
    group's pooled scores by class. A class whose bins a group did not send is left out of it.
    """
    labels = list(groups)
    width = 0.8 / max(len(labels), 1)
    x = np.arange(len(IOU_BINS))
    fig = Figure(figsize=(4.6 * len(classes), 4.2), layout="constrained")
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
                ax.text(xi, hi + 0.02, f"{share:.0%}", ha="center", va="bottom", fontsize=9)
        ax.set_xticks(x, [f"IoU {b}" for b in IOU_BINS], fontsize=10)
        ax.set_title(f"{SEED_COLUMN.get(cls, cls)} ({TISSUE_TEXT.get(cls, cls)})", fontsize=11)
        ax.set_ylim(0.0, 1.12)
        ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        ax.tick_params(axis="y", labelsize=10)
    axes[0].set_ylabel("share of slices where the class is defined", fontsize=10)
    handles = [
        Patch(
            facecolor=GROUP_STYLE[g % len(GROUP_STYLE)][0],
            hatch=GROUP_STYLE[g % len(GROUP_STYLE)][1],
            edgecolor="white",
            label=label,
        )
        for g, label in enumerate(labels)
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=1, fontsize=10, frameon=False)
    return to_png(fig)


def polar_maps_figure(maps: Mapping[str, PolarMap], keys: Sequence[str]) -> bytes:
    """Discordant area per slice (cm² summed / n_slices), sites side by side, one row per class:direction.

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
    fig = Figure(figsize=(2.5 * len(sites) + 1.4, 2.5 * len(keys) + 0.3), layout="constrained")
    axes = fig.subplots(len(keys), len(sites), subplot_kw={"projection": "polar"}, squeeze=False)
    mesh = None
    for row, key in zip(axes, keys, strict=True):
        for ax, site in zip(row, sites, strict=True):
            # PolarMap convention: 0 deg = anterior (drawn at the top), 90 deg = image right.
            ax.set_theta_zero_location("N")
            ax.set_theta_direction(-1)
            ax.set_xticks(
                np.deg2rad(np.arange(0, 360, 90)), ["anterior", "image right", "posterior", "image left"]
            )
            ax.set_yticks([0.5, 1.0], ["", ""])
            ax.tick_params(labelsize=6, pad=-2)
            ax.grid(alpha=0.4)
            ax.set_ylim(0.0, 1.0)
            values = per_site.get((site, key))
            if values is None or values.ndim != 2 or not values.size:
                ax.set_title(f"{site}\n(no map)", fontsize=8)
                continue
            n_angle, n_radius = values.shape
            theta = np.linspace(0.0, 2 * np.pi, n_angle + 1)
            radius = np.linspace(0.0, 1.0, n_radius + 1)
            mesh = ax.pcolormesh(theta, radius, values.T, cmap="Reds", norm=norm, shading="flat")
            ax.set_title(f"{site} (n={maps[site].n_slices})", fontsize=8)
        cls, _, direction = key.partition(":")
        row[0].set_ylabel(f"{TISSUE_TEXT.get(cls, cls)}\n{direction}", fontsize=8, labelpad=22)
    if mesh is not None:
        fig.colorbar(mesh, ax=axes.ravel().tolist(), shrink=0.6, label="discordant cm² per slice", pad=0.03)
    return to_png(fig)


def training_figure(rounds: Sequence[RoundRecord]) -> bytes:
    """Pooled validation loss per round (black) and each site's validation loss (thin lines)."""
    fig = Figure(figsize=(5.0, 3.0), layout="constrained")
    ax = fig.add_subplot()
    done = [(r.round, r.pooled_val_loss) for r in rounds if r.pooled_val_loss is not None]
    ax.plot([x for x, _ in done], [y for _, y in done], "o-", color="black", label="pooled")
    sites = sorted({s for r in rounds for s in r.per_site})
    for site in sites:
        points = [
            (r.round, r.per_site[site]["val-loss"]) for r in rounds if "val-loss" in r.per_site.get(site, {})
        ]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, ".-", lw=0.8, alpha=0.8, label=site)
    for r in rounds:
        if r.status == "failed":
            ax.axvline(r.round, color="red", lw=0.8, ls=":")
    ax.set_xlabel("round", fontsize=8)
    ax.set_ylabel("validation loss (mean over slices)", fontsize=8)
    ax.tick_params(labelsize=8)
    if rounds:
        ax.set_xticks(sorted({r.round for r in rounds}))
    ax.legend(fontsize=7, frameon=False)
    return to_png(fig)
