"""Each site's verdict (server.report.verdict) and the report's first screen (server.report.headline).

Built on the hand-made study of tests/report_builders.py: internal hospital-a (8 of 10 slices
at muscle IoU >= 0.9) and hospital-f (7 of 8), external hospital-b (2 of 8; leaves the psoas
out, its convention) and hospital-g (1 of 6; no convention), three sites without a result.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
from report_builders import (
    BINS_A,
    BINS_F,
    attributed_psoas,
    study_report,
    suppressed_study,
    top_bin_study,
)
from scipy import stats as scipy_stats

from protocols.findings import Finding
from protocols.report import StudyReport
from server.report import write_report
from server.report.headline import VERDICT_COLUMNS
from server.report.verdict import MIN_CONVENTION_SHARE, MIN_SLICES, site_verdicts

# --------------------------------------------------------------------------- the rules, one per code


def _verdicts(report: StudyReport) -> dict[str, tuple[str, str]]:
    return {site: (v.code, v.sentence) for site, v in site_verdicts(report).items()}


def test_a_site_not_significantly_below_the_internal_sites_performs_as_internal() -> None:
    code, sentence = _verdicts(study_report())["hospital-a"]
    assert code == "as_internal"
    # compared with the *other* internal site (hospital-f, 7 of 8), not with a pool holding itself
    p = scipy_stats.fisher_exact([[8, 2], [7, 1]]).pvalue
    assert sentence == (
        f"performs as on internal data: 8/10 = 80% vs 7/8 = 88% at the other internal sites (Fisher exact "
        f"p = {p:.2g})"
    )


def test_a_lower_score_with_a_large_systematic_site_convention_is_explained_by_labelling() -> None:
    code, sentence = _verdicts(study_report())["hospital-b"]
    assert code == "explained_by_labelling"
    p = scipy_stats.fisher_exact([[2, 6], [15, 3]]).pvalue
    assert p < 0.05
    assert sentence == (
        "lower score explained by this site's labelling: leaves psoas out of muscle (muscle -12.1 cm², "
        "SMI -4.3 cm²/m² per slice; 2 of 8 sarcopenia calls change); 2/8 = 25% vs 15/18 = 83% internal "
        f"(Fisher exact p = {p:.2g})"
    )


def test_a_lower_score_without_a_site_convention_is_the_models() -> None:
    code, sentence = _verdicts(study_report())["hospital-g"]
    assert code == "model_underperforms"
    assert sentence.startswith(
        "the model underperforms here; labelling does not explain it: 1/6 = 17% vs 15/18"
    )


def _with_b_findings(update: dict[str, object]) -> StudyReport:
    """The study with hospital-b's psoas convention changed (JSON field names)."""
    finding = Finding.model_validate(attributed_psoas(8).model_dump(by_alias=True) | update)
    report = study_report()
    sites = [
        s.model_copy(update={"findings": [finding]}) if s.site == "hospital-b" else s for s in report.sites
    ]
    return report.model_copy(update={"sites": sites})


@pytest.mark.parametrize(
    "update",
    [
        {"attribution": "model"},  # the difference is the model's, not the site's labelling
        {"attribution": "undetermined"},
        {"systematic": False},  # not consistent across the site's slices
        {"mean_area_share": MIN_CONVENTION_SHARE - 0.001},  # too small to move a slice out of the top bin
        {"class": "visceral_fat"},  # a fat convention does not explain a muscle score
    ],
)
def test_a_convention_that_cannot_explain_the_drop_leaves_it_to_the_model(update: dict[str, object]) -> None:
    assert _verdicts(_with_b_findings({}))["hospital-b"][0] == "explained_by_labelling"
    assert _verdicts(_with_b_findings(update))["hospital-b"][0] == "model_underperforms"


def test_a_convention_of_exactly_the_minimum_share_explains_the_drop() -> None:
    report = _with_b_findings({"mean_area_share": MIN_CONVENTION_SHARE})
    assert _verdicts(report)["hospital-b"][0] == "explained_by_labelling"


def test_an_internal_site_is_compared_with_the_other_internal_sites_not_itself() -> None:
    # 3 of 12 against 8 of 8 is significant (p < 0.001); against a pool holding itself (11 of 20), not
    assert scipy_stats.fisher_exact([[3, 9], [11, 9]]).pvalue > 0.05
    verdicts = _verdicts(top_bin_study({"x": (3, 12, "internal"), "y": (8, 8, "internal")}))
    assert verdicts["x"][0] == "model_underperforms"
    assert "vs 8/8 = 100% at the other internal sites" in verdicts["x"][1]
    assert verdicts["y"][0] == "as_internal"


def test_a_significantly_better_site_says_so_and_is_as_internal() -> None:
    verdicts = _verdicts(
        top_bin_study({"x": (2, 12, "internal"), "y": (3, 12, "internal"), "z": (12, 12, "external")})
    )
    assert verdicts["z"][0] == "as_internal"
    assert verdicts["z"][1].startswith("performs better than on internal data: 12/12 = 100% vs 5/24 = 21%")


def test_too_few_slices_at_the_site_or_in_the_reference_to_tell() -> None:
    few = MIN_SLICES - 1
    verdicts = _verdicts(
        top_bin_study({"a": (few, few, "internal"), "b": (9, 10, "internal"), "c": (0, few, "external")})
    )
    assert verdicts["c"] == (
        "too_few_slices",
        f"too few slices to tell ({few} with muscle; a verdict needs {MIN_SLICES})",
    )
    assert verdicts["a"][0] == "too_few_slices"
    # b's reference is a alone: too few internal slices, whatever b's share
    assert verdicts["b"] == (
        "too_few_slices",
        f"too few internal slices to tell ({few} at a; a verdict needs {MIN_SLICES})",
    )
    # one slice more and the same sites are judged
    enough = _verdicts(
        top_bin_study({"a": (MIN_SLICES, MIN_SLICES, "internal"), "c": (0, MIN_SLICES, "external")})
    )
    assert enough["c"][0] == "model_underperforms"


def test_without_another_internal_site_there_is_no_reference() -> None:
    verdicts = _verdicts(top_bin_study({"a": (8, 10, "internal"), "b": (1, 10, "external")}))
    assert verdicts["a"] == (
        "no_reference",
        "the only internal site: it is the internal reference (8/10 = 80%)",
    )
    assert verdicts["b"][0] == "model_underperforms"
    only_external = _verdicts(top_bin_study({"b": (1, 10, "external")}))
    assert only_external["b"] == ("no_reference", "no internal site to compare with")


def test_withheld_bins_give_no_verdict_on_the_score() -> None:
    verdicts = _verdicts(suppressed_study())
    assert verdicts["hospital-c"] == (
        "withheld",
        "its release policy withheld the muscle IoU bins: nothing to judge",
    )
    assert verdicts["hospital-b"][0] == "explained_by_labelling"  # the others are judged as before


def test_sites_without_a_result_say_why() -> None:
    verdicts = _verdicts(study_report())
    assert verdicts["hospital-c"] == ("no_result", "no usable result: failed (ClientApp raised: disk full)")
    assert verdicts["hospital-e"] == (
        "no_result",
        "no usable result: no reply in time (no reply within 900 s)",
    )
    assert verdicts["hospital-d"][0] == "no_result"


def test_a_comparison_of_label_sets_has_no_verdict() -> None:
    assert site_verdicts(study_report().model_copy(update={"task": "compare"})) == {}


def test_the_internal_reference_is_pooled_over_the_internal_sites_that_sent_bins() -> None:
    """hospital-b against hospital-a + hospital-f: 8 + 7 of 10 + 8."""
    assert "vs 15/18 = 83% internal" in _verdicts(study_report())["hospital-b"][1]
    assert BINS_A["muscle"][0] + BINS_F["muscle"][0] == 15


# --------------------------------------------------------------------------- the files


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("verdict")
    write_report(study_report(), out)
    return out


def test_each_site_in_report_json_carries_its_verdict(written: Path) -> None:
    data = json.loads((written / "report.json").read_text(encoding="utf-8"))
    assert data["schema_version"] == "4"
    codes = {s["site"]: s["verdict"]["code"] for s in data["sites"]}
    assert codes == {
        "hospital-a": "as_internal",
        "hospital-f": "as_internal",
        "hospital-b": "explained_by_labelling",
        "hospital-g": "model_underperforms",
        "hospital-c": "no_result",
        "hospital-d": "no_result",
        "hospital-e": "no_result",
    }
    b = next(s for s in data["sites"] if s["site"] == "hospital-b")
    assert b["verdict"]["sentence"].startswith("lower score explained by this site's labelling: leaves psoas")
    with (written / "tables" / "sites.csv").open(encoding="utf-8", newline="") as handle:
        rows = {row["site"]: row for row in csv.DictReader(handle)}
    assert rows["hospital-b"]["verdict_code"] == "explained_by_labelling"  # machine names in the CSV
    assert rows["hospital-b"]["verdict"] == b["verdict"]["sentence"]


def _md_tables(md: str) -> list[tuple[list[str], list[str]]]:
    """Each Markdown table's header cells and row lines, in order."""
    lines = md.splitlines()
    out = []
    for i, line in enumerate(lines[:-1]):
        if line.startswith("| ") and lines[i + 1].startswith("|---"):
            rows = []
            for row in lines[i + 2 :]:
                if not row.startswith("| "):
                    break
                rows.append(row)
            out.append(([c.strip() for c in line.strip("|").split(" | ")], rows))
    return out


def test_the_first_table_of_the_md_is_the_verdict_table_under_two_sentences_on_the_model(
    written: Path,
) -> None:
    md = (written / "report.md").read_text(encoding="utf-8")
    header, rows = _md_tables(md)[0]
    assert header == list(VERDICT_COLUMNS)
    assert [r.split(" | ")[0].lstrip("| ") for r in rows] == [
        "hospital-a",
        "hospital-f",
        "hospital-b",
        "hospital-g",
        "hospital-c",
        "hospital-d",
        "hospital-e",
    ]
    b = next(r for r in rows if r.startswith("| hospital-b |"))
    assert (
        "| external | 8 slices of 7 patients | 2/8 = 25% (95% CI 7%–59%) | 4/8 = 50% | 6/8 = 75% | "
        "leaves psoas out of muscle (muscle -12.1 cm², SMI -4.3 cm²/m² per slice; 2 of 8 sarcopenia calls "
        "change) | lower score explained by this site's labelling" in b
    )
    before = md[: md.index("| site | role |")]
    assert before.count("\n## ") == 0  # nothing but the title and the model before it
    model = before.splitlines()[2]
    assert (
        "the model reaches muscle IoU ≥ 0.9 on 15/18 = 83% of slices (95% CI 61%–94%; pooled over 18 "
        "slices of 16 patients at 2 internal sites: hospital-a, hospital-f)" in model
    )
    p = scipy_stats.fisher_exact([[15, 3], [3, 11]]).pvalue
    assert f"(internal vs external: two-sided Fisher exact test, p = {p:.2g})" in model
    assert "it adds tissue along the contours to muscle (on 15 of 18 slices, 2.0 cm² per slice)" in model
    # the seed's tables follow right after the verdict and the internal/external comparison
    headings = [line for line in md.splitlines() if line.startswith("## ")]
    assert headings[:2] == [
        "## Internal and external validation at a glance",
        "## IoU bins (the seed's Table 2 layout)",
    ]


def test_the_verdict_table_is_the_first_thing_in_the_html_with_its_id(written: Path) -> None:
    page = (written / "report.html").read_text(encoding="utf-8")
    assert page.count('id="verdict"') == 1
    start = page.index('<div class="table-wrap" id="verdict">')
    assert start < page.index("<table") + 1 and start < page.index("<h2>")


def test_no_md_table_header_is_snake_case(written: Path, tmp_path: Path) -> None:
    texts = [(written / "report.md").read_text(encoding="utf-8")]
    texts.append(write_report(suppressed_study(), tmp_path).markdown.read_text(encoding="utf-8"))
    snake = re.compile(r"[A-Za-z]_[A-Za-z]")
    for md in texts:
        tables = _md_tables(md)
        assert len(tables) > 15
        for header, _ in tables:
            assert not [h for h in header if snake.search(h)], header


def test_the_appendix_holds_the_full_hashes_and_tables_show_them_short(written: Path) -> None:
    md = (written / "report.md").read_text(encoding="utf-8")
    body, appendix = md.split("## Appendix: engineering detail")
    assert appendix.count("\n## ") == 0  # the appendix is the last section
    for full in ("f00dfeed12345678", "sha256:hospital-a-0123456789abcdef", "node 11"):
        assert full in appendix and full not in body, full
    assert "Run 42" in appendix and "Run 42" not in body
    assert "Lancet Oncol" in appendix and "Training rounds" in appendix
    assert "| f00dfeed1234… |" in appendix  # shortened to 12 characters in the table
    for _, rows in _md_tables(md):
        for row in rows:
            assert not re.search(r"[0-9a-f]{13,}", row), row


def test_bland_altman_limits_carry_their_intervals_in_every_format(written: Path) -> None:
    with (written / "tables" / "area_agreement.csv").open(encoding="utf-8", newline="") as handle:
        row = next(r for r in csv.DictReader(handle) if r["site"] == "hospital-a" and r["tissue"] == "muscle")
    n, mean, sd = int(row["n"]), float(row["mean_diff_cm2"]), float(row["sd_diff_cm2"])
    half = scipy_stats.t.ppf(0.975, n - 1) * (3 * sd**2 / n) ** 0.5
    low = mean - 1.96 * sd
    assert float(row["loa_low_cm2"]) == pytest.approx(low)
    assert (float(row["loa_low_ci_low_cm2"]), float(row["loa_low_ci_high_cm2"])) == pytest.approx(
        (low - half, low + half)
    )
    md = (written / "report.md").read_text(encoding="utf-8")
    assert f"{low:+.1f} ({low - half:+.1f} to {low + half:+.1f})" in md
    assert "sqrt(3 sd² / n) (Bland & Altman 1986, 1999)" in md
