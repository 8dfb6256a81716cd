"""The report's figures are readable: colours a red-green colour-blind reader tells apart, text no
smaller than the page's, figures no wider than the page, a findings matrix that grows with its findings.

Sizes are read from each figure's SVG (``svg.fonttype = none``: text stays text), whose user unit
is the point: at its natural size on the page a point is 4/3 CSS px.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable

import numpy as np
import pytest
from matplotlib.colors import to_rgb

from protocols.classes import METRIC_CLASSES, TISSUES
from server import figures
from server.report.render import inline_svg
from tests.report_builders import study_report, two_sites

#: Machado, Oliveira & Fernandes (2009), severity 1: linear-RGB simulation of the two red-green
#: deficiencies (about 1 man in 12 has one).
CVD = {
    "protanopia": np.array(
        [[0.152286, 1.052583, -0.204868], [0.114503, 0.786281, 0.099216], [-0.003882, -0.048116, 1.051998]]
    ),
    "deuteranopia": np.array(
        [[0.367322, 0.860646, -0.227968], [0.280085, 0.672501, 0.047413], [-0.011820, 0.042940, 0.968881]]
    ),
}
#: Smallest CIE76 colour difference between two colours of one palette as a colour-blind reader
#: sees them (about 2.3 is just noticeable; the red-green IoU bins of old were 6, tab10's 5).
MIN_DELTA_E = 15.0
PX_PER_PT = 4.0 / 3.0


def _lab(hex_colour: str, matrix: np.ndarray) -> np.ndarray:
    c = np.asarray(to_rgb(hex_colour))
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    seen = np.clip(matrix @ linear, 0.0, 1.0)
    xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]) @ seen
    xyz /= np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def closest_pair_as_seen(colours: list[str]) -> float:
    """Smallest colour difference of any two colours under protanopia or deuteranopia."""
    return min(
        float(np.linalg.norm(_lab(a, m) - _lab(b, m)))
        for m in CVD.values()
        for a, b in itertools.combinations(colours, 2)
    )


def _hue(hex_colour: str) -> tuple[float, float]:
    r, g, b = to_rgb(hex_colour)
    high, low = max(r, g, b), min(r, g, b)
    if high == low:
        return 0.0, 0.0
    d = high - low
    h = ((g - b) / d) % 6 if high == r else (b - r) / d + 2 if high == g else (r - g) / d + 4
    return 60.0 * h, d / high


def is_red(c: str) -> bool:
    h, s = _hue(c)
    return s > 0.5 and (h < 20 or h > 340)


def is_green(c: str) -> bool:
    h, s = _hue(c)
    return s > 0.4 and 75 <= h <= 160


PALETTES = {
    "iou bins": list(figures.BIN_COLOURS.values()),
    "groups": [c for c, _ in figures.GROUP_STYLE],
    "lines (with the pooled black)": ["#000000", *figures.LINE_COLOURS],
    "attribution frames": [c for c, _, _ in figures.ATTRIBUTION_STYLE.values()],
}


@pytest.mark.parametrize("name", PALETTES)
def test_palette_colours_stay_apart_for_red_green_colour_blindness(name: str) -> None:
    assert closest_pair_as_seen(PALETTES[name]) >= MIN_DELTA_E


def test_the_check_sees_a_red_green_palette() -> None:
    """The bins' old red-to-green colours and matplotlib's tab10 fail the check above."""
    assert closest_pair_as_seen(["#1a9850", "#a6d96a", "#fdae61", "#d73027"]) < MIN_DELTA_E
    assert closest_pair_as_seen(["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"]) < MIN_DELTA_E
    assert is_red("#d73027") and is_green("#1a9850")


def test_iou_bins_have_no_red_green_pair() -> None:
    bins = PALETTES["iou bins"]
    assert not (any(map(is_red, bins)) and any(map(is_green, bins))), bins


# --------------------------------------------------------------------------- sizes, from the SVG


def _svg_size_pt(svg: str) -> tuple[float, float]:
    head = re.search(r"<svg\b[^>]*>", svg)
    assert head is not None
    width = re.search(r'width="([\d.]+)pt"', head.group(0))
    height = re.search(r'height="([\d.]+)pt"', head.group(0))
    assert width and height
    return float(width.group(1)), float(height.group(1))


def _font_sizes(svg: str) -> list[float]:
    sizes = [float(s) for s in re.findall(r"<text[^>]*font-size: ([\d.]+)px", svg)]
    assert sizes, "no <text> in the SVG: was it saved with svg.fonttype = none?"
    return sizes


def _matrix(n_sites: int, n_findings: int, site: str = "hospital") -> figures.Drawing:
    rng = np.random.default_rng(0)
    prevalence = rng.uniform(0.0, 1.0, (n_sites, n_findings))
    prevalence[0, 0] = np.nan
    tissues = ["muscle", "subcutaneous_fat", "visceral_fat"]
    regions = ["psoas", "paraspinal", "abdominal_wall", "boundary", "intramuscular_fat", "other"]
    columns = [
        f"{tissues[k % 3]}/{'site_includes' if k % 2 else 'site_excludes'}/{regions[k % 6]}"
        for k in range(n_findings)
    ]
    attribution = np.array([["model"] * n_findings] * n_sites, dtype=object)
    attribution[-1, 0] = "site_convention"
    return figures.findings_matrix_figure(
        prevalence,
        prevalence > 0.7,
        [f"{site}-{i} ({'internal' if i % 2 else 'external'})" for i in range(n_sites)],
        columns,
        attribution,
    )


def _drawings() -> dict[str, Callable[[], figures.Drawing]]:
    sites = two_sites()
    report = study_report()
    return {
        "iou_bins": lambda: figures.iou_bins_figure(
            {f"{s}\n(external)": p.scores for s, p in sites.items()}, METRIC_CLASSES
        ),
        "area_agreement": lambda: figures.area_agreement_figure(
            {s: p.areas for s, p in sites.items()}, TISSUES
        ),
        "smi_agreement": lambda: figures.smi_figure({s: p.smi for s, p in sites.items() if p.smi}),
        "findings_matrix": lambda: _matrix(4, 11),
        "internal_external": lambda: figures.internal_external_figure(
            {
                f"{role}: 10 slices of 9 patients at 1 site": sites[s].scores
                for role, s in zip(("internal", "external"), sites, strict=True)
            }
        ),
        "polar_maps": lambda: figures.polar_maps_figure(
            {s: p.discrepancy.polar for s, p in sites.items() if p.discrepancy and p.discrepancy.polar},
            ["muscle:site_excludes", "muscle:site_includes"],
        ),
        "training_loss": lambda: figures.training_figure(report.training),
    }


@pytest.mark.parametrize("name", list(_drawings()))
def test_figure_text_is_as_large_as_the_page_text_and_fits_the_page(name: str) -> None:
    drawing = _drawings()[name]()
    assert bytes(drawing[:8]) == b"\x89PNG\r\n\x1a\n"
    width_pt, _ = _svg_size_pt(drawing.svg)
    # no wider than the page's 1200 px, so the page never shrinks it below its natural size
    assert width_pt * PX_PER_PT <= 1200
    assert width_pt <= figures.MAX_WIDTH_IN * 72 + 1
    smallest = min(_font_sizes(drawing.svg))
    assert smallest >= figures.SMALL_PT
    assert smallest * PX_PER_PT >= 14.0  # the page's body text is 16 px, its tables' 13.6 px


def test_findings_matrix_grows_a_row_per_finding_and_stays_within_the_page() -> None:
    few, many = _svg_size_pt(_matrix(3, 3).svg), _svg_size_pt(_matrix(3, 12).svg)
    assert many[1] - few[1] >= 9 * 0.5 * 72 * 0.9  # about half an inch per finding
    assert many[0] <= figures.MAX_WIDTH_IN * 72 + 1
    # twelve sites with long names: site names turned, finding labels wrapped, still full-size text
    crowded = _matrix(12, 12, site="university-hospital-of-the-northwest")
    width, _ = _svg_size_pt(crowded.svg)
    assert width <= figures.MAX_WIDTH_IN * 72 + 1
    assert min(_font_sizes(crowded.svg)) >= figures.SMALL_PT


def test_finding_labels_read_as_words() -> None:
    assert figures.finding_label("muscle/site_includes/psoas") == "muscle: site includes psoas"
    assert figures.finding_label("subcutaneous_fat/site_excludes/boundary") == (
        "subcutaneous fat: site excludes boundary"
    )


def test_inline_svg_prefixes_ids_and_drops_what_an_html_page_does_not_need() -> None:
    svg = figures.training_figure(study_report().training).svg
    one, two = inline_svg(svg, "fig-a"), inline_svg(svg, "fig-b")
    assert one.startswith("<svg ") and "<metadata" not in one and "http" not in one
    ids_one = set(re.findall(r'\bid="([^"]+)"', one))
    ids_two = set(re.findall(r'\bid="([^"]+)"', two))
    assert ids_one and not ids_one & ids_two
    assert all(i.startswith("fig-a-") for i in ids_one)
    for ref in re.findall(r'(?:url\(#|href="#)([^")]+)', one):
        assert ref in ids_one, ref  # every reference still points at an element
