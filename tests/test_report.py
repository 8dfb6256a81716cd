"""The study report: the seed table, the other tables, the document and the four output formats.

Reports are built by hand with known numbers (tests/report_builders.py). ``python
tests/test_report.py`` rewrites the example files in tests/data/report/ from the same builders.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from report_builders import (
    BINS_A,
    PSOAS_EVIDENCE,
    payload,
    scores,
    site_diffs,
    study_report,
    suppressed_study,
    two_sites,
)

from common.pooling import pool_payloads
from protocols.classes import IOU_BINS, TISSUES
from protocols.compute import ComputeUsed
from protocols.payloads import AreaAgreement
from protocols.report import RoundRecord, SiteResult, StudyReport
from server.report import finished_report, summary_lines, with_pooled, write_report
from server.report.blocks import Block, Bullets, Heading, Image, Table, Text
from server.report.document import build_document
from server.report.groups import POOLED
from server.report.render import render_html, render_markdown
from server.report.tables import (
    COVERAGE_COLUMN,
    NOT_POOLABLE,
    area_table,
    file_stem,
    iou_summary_table,
    pooled_seed_table,
    seed_table,
)

DATA = Path(__file__).parent / "data" / "report"

# --------------------------------------------------------------------------- schema


def test_example_json_files_round_trip() -> None:
    files = sorted(DATA.glob("*.json"))
    assert len(files) >= 2
    for path in files:
        report = StudyReport.model_validate_json(path.read_text(encoding="utf-8"))
        assert json.loads(report.model_dump_json()) == json.loads(path.read_text(encoding="utf-8")), path.name


def test_example_file_matches_builder() -> None:
    stored = StudyReport.model_validate_json(
        (DATA / "evaluate_with_training.json").read_text(encoding="utf-8")
    )
    assert stored == finished_report(study_report())


def test_ok_site_without_payload_is_rejected() -> None:
    with pytest.raises(ValueError, match="needs a payload"):
        SiteResult(site="x", status="ok")


def test_duplicate_site_names_are_rejected() -> None:
    sites = [SiteResult(site="x", status="timeout", reason="-")] * 2
    with pytest.raises(ValueError, match="repeated"):
        StudyReport(
            created="t", run_id="1", study_name="s", task="evaluate", cutoff_set="korean", sites=sites
        )


def test_training_history_dicts_from_the_training_study_validate() -> None:
    record = {
        "round": 2,
        "sites_sent": ["a", "b"],
        "sites_replied": ["a"],
        "sites_failed": {"b": "timeout"},
        "per_site": {"a": {"val-loss": 0.5}},
        "status": "ok",
        "pooled_val_loss": 0.5,
        "pooled_val_iou": {"muscle": 0.8, "msv": None},
        "weights_hash": "abc",
        "improved": False,
        "seconds": 3.0,
    }
    assert RoundRecord.model_validate(record).sites_failed == {"b": "timeout"}


# --------------------------------------------------------------------------- pooling


def test_pooled_seed_table_is_the_hand_added_counts() -> None:
    pooled = pool_payloads(two_sites())
    table = seed_table(pooled.scores, pooled.n_used)
    assert list(table.index) == [*IOU_BINS, "undefined"]
    assert list(table.columns) == ["M", "S", "V", "MSV", "ratio"]
    # M: 8+2, S: 9+7, V: 6+5, MSV: 8+4 in the top bin -> 10+16+11+12 = 49 of 71 defined cells
    assert table.loc["[0.9,1.0]", ["M", "S", "V", "MSV"]].tolist() == [10, 16, 11, 12]
    assert table.loc["[0,0.7)", ["M", "S", "V", "MSV"]].tolist() == [1, 0, 0, 0]
    assert table.loc["undefined", ["M", "S", "V", "MSV"]].tolist() == [0, 0, 1, 0]
    assert table.loc["[0.9,1.0]", "ratio"] == "49/71 (69%)"
    assert table.loc["[0.8,0.9)", "ratio"] == "15/71 (21%)"
    assert table.loc["undefined", "ratio"] == "1/72 (1%)"
    with_coverage = pooled_seed_table(pooled)
    assert with_coverage.drop(columns=COVERAGE_COLUMN).equals(table)
    assert set(with_coverage[COVERAGE_COLUMN]) == {"complete: all 2 sites"}


def test_seed_ratio_text_reproduces_the_seed_table_2() -> None:
    seed = {"muscle": (355, 14, 1, 0, 0), "subcutaneous_fat": (367, 2, 1, 0, 0)}
    seed |= {"visceral_fat": (291, 71, 8, 0, 0), "msv": (351, 18, 1, 0, 0)}
    table = seed_table({c: scores(b, 0.95, 0.02, 1, 1) for c, b in seed.items()}, 370)
    assert table["ratio"].tolist() == [
        "1364/1480 (92%)",
        "105/1480 (7%)",
        "11/1480 (1%)",
        "0/1480 (0%)",
        "0/1480 (0%)",
    ]


def test_seed_table_with_one_column_is_the_seed_table_3_layout() -> None:
    table = seed_table({"muscle": scores((38, 61, 34, 10, 0), 0.8, 0.1, 1, 1)}, 143, classes=("muscle",))
    assert table["ratio"].tolist()[:4] == ["38/143 (27%)", "61/143 (43%)", "34/143 (24%)", "10/143 (7%)"]


def test_a_suppressed_bin_is_not_shown_as_zero() -> None:
    s = scores((5, 1, 0, 0, 0), 0.9, 0.05, 1, 1).model_copy(update={"bins": {"[0.9,1.0]": 5, "[0.8,0.9)": 1}})
    table = seed_table({"muscle": s}, 6, classes=("muscle",))
    assert table.loc["[0.7,0.8)", "M"] is not None and str(table.loc["[0.7,0.8)", "M"]) == "<NA>"
    assert set(table["ratio"]) == {"suppressed"}


def test_pooled_bland_altman_equals_the_concatenated_slices() -> None:
    parts = {"a": site_diffs(0, 10, 0.5), "b": site_diffs(1, 8, -4.0)}
    pooled = pool_payloads(two_sites())
    for tissue in TISSUES:
        all_diffs = np.concatenate([parts["a"][tissue], parts["b"][tissue]])
        area = pooled.areas[tissue]
        assert area.n == 18
        assert area.mean_diff_cm2 == pytest.approx(all_diffs.mean(), rel=1e-12)
        assert area.sd_diff_cm2 == pytest.approx(all_diffs.std(ddof=1), rel=1e-10)
    table = area_table({}, [pooled]).set_index("tissue")
    muscle = np.concatenate([parts["a"]["muscle"], parts["b"]["muscle"]])
    low = muscle.mean() - 1.96 * muscle.std(ddof=1)
    high = muscle.mean() + 1.96 * muscle.std(ddof=1)
    assert table.loc["muscle", "loa_low_cm2"] == pytest.approx(low, rel=1e-10)
    assert table.loc["muscle", "loa_high_cm2"] == pytest.approx(high, rel=1e-10)
    smi_all = np.concatenate([parts["a"]["muscle"], parts["b"]["muscle"]]) / 2.9
    assert pooled.smi is not None
    assert pooled.smi.sd_diff == pytest.approx(smi_all.std(ddof=1), rel=1e-10)


def test_pooled_iou_mean_is_weighted_and_median_not_poolable() -> None:
    pooled = pool_payloads(two_sites())
    muscle = pooled.scores["muscle"]
    assert muscle.iou.n == 18
    assert muscle.iou.mean == pytest.approx((10 * 0.9 + 8 * 0.8) / 18)
    assert muscle.iou.median is None
    assert muscle.intersection_px == 900 * 18 and muscle.union_px == 1000 * 18
    summary = iou_summary_table({}, [pooled])
    assert set(summary["iou_median"]) == {NOT_POOLABLE}


def test_file_stems_are_safe_and_unique() -> None:
    taken: set[str] = set()
    assert file_stem("Hospital B/ICU", taken) == "Hospital_B_ICU"
    assert file_stem("Hospital B ICU", taken) == "Hospital_B_ICU-2"
    assert file_stem("pooled", taken) == "site-pooled"
    assert file_stem("pooled_internal", taken) == "site-pooled_internal"  # never a pooled group's file
    assert file_stem("../..", taken) == "site"


# --------------------------------------------------------------------------- files


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, StudyReport]:
    out = tmp_path_factory.mktemp("report")
    report = study_report()
    write_report(report, out)
    return out, report


def test_report_json_round_trips(written: tuple[Path, StudyReport]) -> None:
    out, report = written
    stored = StudyReport.model_validate_json((out / "report.json").read_text(encoding="utf-8"))
    assert stored == finished_report(report)
    assert stored.pooled is not None
    internal, external = stored.pooled.groups
    assert (internal.role, internal.results.sites) == ("internal", ["hospital-a", "hospital-f"])
    assert (external.role, external.results.sites) == ("external", ["hospital-b", "hospital-g"])
    assert internal.tables["pooled_internal_iou_bins"].state == "complete"


def test_csv_tables_per_site_and_pooled(written: tuple[Path, StudyReport]) -> None:
    out, _ = written
    names = {p.name for p in (out / "tables").glob("*.csv")}
    expected = {"hospital-a_iou_bins.csv", "hospital-b_iou_bins.csv", "sites.csv"}
    expected |= {"pooled_internal_iou_bins.csv", "pooled_external_iou_bins.csv", "internal_external.csv"}
    expected |= {"area_agreement.csv", "smi_agreement.csv", "sarcopenia_confusion.csv", "findings.csv"}
    expected |= {"raw_vs_protocol_bins.csv", "label_audit.csv"}
    assert expected <= names
    assert "pooled_iou_bins.csv" not in names  # internal and external are never pooled together
    with (out / "tables" / "pooled_internal_iou_bins.csv").open(encoding="utf-8", newline="") as handle:
        pooled = list(csv.reader(handle))
    assert pooled[0] == ["IoU", "M", "S", "V", "MSV", "ratio", "coverage"]
    # hospital-a + hospital-f: M 8+7, S 9+8, V 6+6, MSV 8+7 -> 59 of 71 defined cells
    assert pooled[1] == ["[0.9,1.0]", "15", "17", "12", "15", "59/71 (83%)", "complete: all 2 sites"]


def test_failed_sites_appear_with_their_reason_everywhere(written: tuple[Path, StudyReport]) -> None:
    out, _ = written
    texts = {
        name: (out / name).read_text(encoding="utf-8") for name in ("report.json", "report.md", "report.html")
    }
    texts["sites.csv"] = (out / "tables" / "sites.csv").read_text(encoding="utf-8")
    for name, text in texts.items():
        for needle in ("hospital-c", "disk full", "hospital-d", "no_usable_slices", "hospital-e", "timeout"):
            assert needle in text, (name, needle)


def test_html_is_self_contained_with_embedded_figures(written: tuple[Path, StudyReport]) -> None:
    out, _ = written
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "http://" not in page and "https://" not in page
    assert "<link" not in page and "<script" not in page
    # figures inline as SVG with real text (server.figures.Drawing), one per figure block
    assert page.count('<figure id="figure-') >= 6 and page.count("<svg ") >= 6 and "<text " in page
    assert 'class="sys"' in page  # the systematic psoas finding is highlighted


def test_report_states_what_the_numbers_depend_on(written: tuple[Path, StudyReport]) -> None:
    out, _ = written
    for name in ("report.md", "report.html"):
        text = (out / name).read_text(encoding="utf-8")
        for needle in ("f00dfeed12345678", "sha256:hospital-a-0123456789abcdef", "prado2008", "-29..150"):
            assert needle in text, (name, needle)
        assert "Training rounds" in text


def test_impact_sentence_for_the_systematic_psoas_finding(written: tuple[Path, StudyReport]) -> None:
    out, _ = written
    md = (out / "report.md").read_text(encoding="utf-8")
    # net of the opposite direction with its interval (12.1), as the table and the SMI shift; not
    # the one-direction discordant area (12.4)
    assert (
        "hospital-b: leaving out psoas lowers this site's muscle area by 12.1 cm² (95% CI 9.8 to 14.4) "
        "per slice on average" in md
    )
    assert "M harmonised" in md


def test_impact_sentence_without_a_net_area_says_its_area_is_one_directions() -> None:
    """A site's own systematic finding (no attribution, e.g. a comparison) from a site that sent no
    net area: the discordant area, not passed off as net."""
    from server.report.findings import impact_sentences

    site = SiteResult(site="hospital-b", status="ok", payload=two_sites()["hospital-b"])
    (sentence,) = [line for line in impact_sentences(site) if "psoas" in line]
    assert "lowers this site's muscle area by 12.4 cm² (discordant, not net) per slice on average" in sentence


def test_figures_are_real_pngs(written: tuple[Path, StudyReport]) -> None:
    out, _ = written
    pngs = sorted((out / "figures").glob("*.png"))
    names = {p.stem for p in pngs}
    assert {
        "iou_bins",
        "area_agreement",
        "smi_agreement",
        "findings_matrix",
        "polar_maps",
        "training_loss",
        "internal_external",
    } <= names
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5_000, png.name


def test_report_without_usable_site_still_writes_every_format(tmp_path: Path) -> None:
    full = study_report(with_training=False)
    report = full.model_copy(update={"sites": [s for s in full.sites if s.status != "ok"]})
    paths = write_report(report, tmp_path)
    assert "nothing to score or pool" in paths.markdown.read_text(encoding="utf-8")
    assert "disk full" in paths.html.read_text(encoding="utf-8")


def test_summary_lines() -> None:
    lines = summary_lines(study_report())
    assert lines[0].startswith("study demo-study (run 42): train + evaluate, model f00dfeed1234")
    # an evaluate-only study (no training rounds) is not announced as trained
    evaluate_only = summary_lines(study_report(with_training=False))
    assert evaluate_only[0].startswith("study demo-study (run 42): evaluate,")
    assert "training: 3 round(s), last round 3 pooled val loss 0.450" in lines
    assert "hospital-a: ok, internal, 10/12 test-split slices, muscle IoU >= 0.9 in 8/10 (80%)" in lines
    assert (
        "hospital-b: ok, external, 8/10 slices, muscle IoU >= 0.9 in 2/8 (25%), "
        "site conventions: muscle/site_excludes/psoas"
    ) in lines
    assert "hospital-c (external): failed - ClientApp raised: disk full" in lines
    assert lines[-2:] == [
        "pooled internal (2 sites, 18 slices, 16 patients): muscle IoU >= 0.9 in 15/18 (83%; 95% CI 61%-94%)",
        "pooled external (2 sites, 14 slices, 12 patients): muscle IoU >= 0.9 in 3/14 (21%; 95% CI 8%-48%)",
    ]


def test_summary_lines_give_each_sites_verdict() -> None:
    """The CLI's summary answers the report's first question too: does the model work here?"""
    from server.report.verdict import site_verdicts

    report = study_report()
    verdicts = site_verdicts(report)
    report = report.model_copy(
        update={"sites": [s.model_copy(update={"verdict": verdicts.get(s.site)}) for s in report.sites]}
    )
    lines = summary_lines(report)
    b = lines.index(next(line for line in lines if line.startswith("hospital-b: ok")))
    assert lines[b + 1] == f"  verdict: {verdicts['hospital-b'].sentence}"
    assert verdicts["hospital-b"].code in ("explained_by_labelling", "model_underperforms")


def test_summary_lines_of_sites_without_a_role_pool_them_together() -> None:
    """A comparison of label sets (no role): one pooled line, as before there were roles."""
    report = study_report().model_copy(
        update={
            "sites": [SiteResult(site=s, status="ok", payload=p) for s, p in two_sites().items()],
            "error_profile": None,
        }
    )
    lines = summary_lines(report)
    assert "hospital-a: ok, 10/12 slices, muscle IoU >= 0.9 in 8/10 (80%)" in lines
    # unattributed findings: the systematic ones are listed as before
    assert (
        "hospital-b: ok, 8/10 slices, muscle IoU >= 0.9 in 2/8 (25%), systematic: muscle/site_excludes/psoas"
        in lines
    )
    assert lines[-1] == "pooled (2 sites, 18 slices): muscle IoU >= 0.9 in 10/18 (56%)"


def _write_examples() -> None:  # pragma: no cover - run by hand
    DATA.mkdir(parents=True, exist_ok=True)
    (DATA / "evaluate_with_training.json").write_text(
        finished_report(study_report()).model_dump_json(indent=2) + "\n", "utf-8"
    )
    full = study_report(with_training=False)
    minimal = full.model_copy(
        update={
            "task": "compare",
            "model_hash": None,
            "model_spec": None,
            "cutoff_set": "korean",
            "sites": [
                s.model_copy(update={"payload": None, "role": None}) for s in full.sites if s.status != "ok"
            ],
            "error_profile": None,
            "notes": [],
        }
    )
    (DATA / "compare_no_usable_site.json").write_text(minimal.model_dump_json(indent=2) + "\n", "utf-8")


if __name__ == "__main__":  # pragma: no cover
    _write_examples()


def test_flower_node_ids_beyond_int64_are_written(tmp_path: Path) -> None:
    """Flower node ids are unsigned 64-bit; the sites table must not force them into int64."""
    report = study_report(with_training=False)
    big = report.model_copy(
        update={"sites": [s.model_copy(update={"node_id": 2**64 - 5}) for s in report.sites]}
    )
    paths = write_report(big, tmp_path)
    assert str(2**64 - 5) in paths.tables["sites"].read_text()


def test_a_training_only_study_writes_its_report(tmp_path: Path) -> None:
    """study.mode=train validates nowhere: no site rows, but the rounds must still be reported."""
    report = study_report(with_training=True).model_copy(update={"sites": []})
    paths = write_report(report, tmp_path)
    assert "Training rounds" in paths.markdown.read_text()
    assert StudyReport.model_validate_json(paths.json.read_text()).training == report.training


# --------------------------------------------------------------------------- internal vs external


def test_internal_and_external_sites_are_pooled_separately_never_together() -> None:
    """Each group's pooled bins are the sums of its own sites only: an internal site's bins are never in
    the external pool, nor the other way round."""
    report = with_pooled(study_report())
    assert report.pooled is not None
    groups = {g.role: g for g in report.pooled.groups}
    assert set(groups) == {"internal", "external"}
    by_site = {s.site: s.payload for s in report.sites if s.payload is not None}
    for role, sites in (
        ("internal", ["hospital-a", "hospital-f"]),
        ("external", ["hospital-b", "hospital-g"]),
    ):
        group = groups[role]
        assert group.results.sites == sites
        assert (group.n_sites, group.n_slices) == (2, sum(by_site[s].n_used for s in sites))  # type: ignore[union-attr]
        assert group.n_patients == sum(by_site[s].n_groups for s in sites)  # type: ignore[union-attr]
        for cls, pooled in group.results.scores.items():
            expected = {b: sum(by_site[s].scores[cls].bins[b] for s in sites) for b in IOU_BINS}  # type: ignore[union-attr]
            assert pooled.bins == expected, (role, cls)
    # the seed's story: 15 of 18 internal test slices at muscle IoU >= 0.9, 3 of 14 external ones
    assert groups["internal"].results.scores["muscle"].bins["[0.9,1.0]"] == 8 + 7
    assert groups["external"].results.scores["muscle"].bins["[0.9,1.0]"] == 2 + 1


def test_each_site_entry_in_report_json_carries_its_role_and_n(written: tuple[Path, StudyReport]) -> None:
    out, _ = written
    data = json.loads((out / "report.json").read_text(encoding="utf-8"))
    sites = {s["site"]: s for s in data["sites"]}
    assert {s: e["role"] for s, e in sites.items()} == {
        "hospital-a": "internal",
        "hospital-f": "internal",
        "hospital-b": "external",
        "hospital-g": "external",
        "hospital-c": "external",
        "hospital-d": "external",
        "hospital-e": "external",
    }
    assert (sites["hospital-a"]["payload"]["split"], sites["hospital-a"]["payload"]["n_used"]) == ("test", 10)
    assert (sites["hospital-b"]["payload"]["split"], sites["hospital-b"]["payload"]["n_used"]) == ("all", 8)
    with (out / "tables" / "sites.csv").open(encoding="utf-8", newline="") as handle:
        rows = {row["site"]: row for row in csv.DictReader(handle)}
    assert (rows["hospital-a"]["role"], rows["hospital-a"]["split"], rows["hospital-a"]["n_used"]) == (
        "internal",
        "test",
        "10",
    )
    assert rows["hospital-a"]["n_in_split"] == "12" and rows["hospital-a"]["n_listed"] == "60"
    assert (rows["hospital-g"]["role"], rows["hospital-g"]["split"], rows["hospital-g"]["n_used"]) == (
        "external",
        "all",
        "6",
    )


def test_md_and_html_open_with_internal_and_external_side_by_side(written: tuple[Path, StudyReport]) -> None:
    out, _ = written
    md = (out / "report.md").read_text(encoding="utf-8")
    headings = [line for line in md.splitlines() if line.startswith("## ")]
    assert headings[0] == "## Internal and external validation at a glance"  # right after the header
    glance = md[md.index(headings[0]) : md.index(headings[1])]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in glance.splitlines() if line.startswith("| ")}
    assert (
        "| internal | 18 slices of 16 patients at 2 sites | 15/18 = 83% (95% CI 61%–94%) |"
        in rows["pooled_internal"]
    )
    assert (
        "| external | 14 slices of 12 patients at 2 sites | 3/14 = 21% (95% CI 8%–48%) |"
        in rows["pooled_external"]
    )
    for site in ("hospital-a", "hospital-f", "hospital-b", "hospital-g"):
        assert site in rows, site
    assert "| internal | 10 slices of 9 patients (test split) | 8/10 = 80%" in rows["hospital-a"]
    assert "figures/internal_external.png" in glance
    page = (out / "report.html").read_text(encoding="utf-8")
    first = page[page.index("<h2>") : page.index("<h2>", page.index("<h2>") + 1)]
    assert "Internal and external validation at a glance" in first
    assert (
        "<td>pooled_internal</td><td>internal</td>" in first
        and "<td>pooled_external</td><td>external</td>" in first
    )
    assert "15/18 = 83% (95% CI 61%–94%)" in first and "3/14 = 21% (95% CI 8%–48%)" in first


def test_seed_tables_are_captioned_with_their_group_and_n(written: tuple[Path, StudyReport]) -> None:
    out, _ = written
    md = (out / "report.md").read_text(encoding="utf-8")
    assert (
        "*pooled_internal: internal (held-out test patients of the sites that trained the model), "
        "18 slices of 16 patients at 2 sites (hospital-a, hospital-f)."
    ) in md
    assert "*pooled_external: external (every usable slice of sites that did not train the model), " in md
    assert "*hospital-a, internal (trained the model; held-out test patients only): 10 slices of 9 " in md
    internal = md.index("### Internal sites")
    external = md.index("### External sites")
    assert internal < md.index("*hospital-f, internal") < external < md.index("*hospital-g, external")


def test_raw_and_protocol_applied_bins_side_by_side(written: tuple[Path, StudyReport]) -> None:
    out, _ = written
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "prediction is cut to these HU ranges before it is scored" in md  # in the header
    section = md[md.index("## Raw and protocol-applied prediction") : md.index("## Area agreement")]
    assert (
        "| IoU | M protocol-applied (used for verdicts) | M raw prediction | MSV protocol-applied" in section
    )
    # internal: protocol-applied 15/18 at the top, raw 5 + 4 = 9/18
    assert "| [0.9,1.0] | 15/18 (83%) | 9/18 (50%) |" in section
    assert "| [0.9,1.0] | 3/14 (21%) | 1/14 (7%) |" in section  # external: raw 1 + 0
    with (out / "tables" / "raw_vs_protocol_bins.csv").open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    pooled = {(r["site"], r["class"], r["scoring"]): r for r in rows}
    assert pooled[("pooled_internal", "M", "raw")]["0.9-1.0"] == "9"
    assert pooled[("pooled_internal", "M", "protocol")]["0.9-1.0"] == "15"
    assert {r["role"] for r in rows if r["site"] == "hospital-b"} == {"external"}


def test_a_site_convention_shows_its_evidence_and_impact(written: tuple[Path, StudyReport]) -> None:
    out, _ = written
    md = (out / "report.md").read_text(encoding="utf-8")
    section = md[md.index("### Findings at hospital-b (external)") :]
    row = next(line for line in section.splitlines() if line.startswith("| muscle | site_excludes | psoas |"))
    assert "7 of 8 slices (95% CI 53%–98%)" in row
    assert "12.1 cm² (95% CI 9.8 to 14.4)" in row and "+4.3 cm²/m²" in row and "2 of 8" in row
    assert "**site convention**" in row and PSOAS_EVIDENCE.replace("|", "\\|") in row
    # the model's contour band at the same site is the model's, with its evidence
    boundary = next(x for x in section.splitlines() if x.startswith("| muscle | site_excludes | boundary |"))
    assert "| model |" in boundary and "following the protocol here" in boundary
    # impact sentences only for the site's convention, not for the model's error
    impact = md[md.index("### Impact of the sites' label conventions") :].split("\n\n")[1]
    assert impact.count("- ") == 1 and "leaving out psoas" in impact
    # the matrix marks whose difference each cell is
    assert "| hospital-b | **88% (site)** | 25% (model) |" in md
    page = (out / "report.html").read_text(encoding="utf-8")
    assert '<td class="sys">site convention</td>' in page
    with (out / "tables" / "findings.csv").open(encoding="utf-8", newline="") as handle:
        found = {(r["site"], r["region"]): r for r in csv.DictReader(handle)}
    assert found[("hospital-b", "psoas")]["attribution"] == "site_convention"
    assert found[("hospital-b", "psoas")]["evidence"] == PSOAS_EVIDENCE
    assert found[("hospital-b", "psoas")]["role"] == "external"
    assert found[("hospital-f", "boundary")]["attribution"] == "model"


def test_the_findings_matrix_and_its_styles_are_keyed_on_the_attribution_not_its_words() -> None:
    """Renaming a word of the report (``ATTRIBUTION_TEXT``) must not unframe the matrix's cells."""
    from typing import get_args

    from protocols.findings import Attribution
    from server import figures
    from server.report.findings import ATTRIBUTION_TEXT, findings_matrix

    every = {*get_args(Attribution), None}
    assert set(figures.ATTRIBUTION_STYLE) == every and set(ATTRIBUTION_TEXT) == every
    prevalence, _, attribution = findings_matrix(study_report())
    assert attribution.loc["hospital-b", "muscle/site_excludes/psoas"] == "site_convention"
    assert attribution.loc["hospital-b", "muscle/site_excludes/boundary"] == "model"
    unreported = [
        (site, key) for site in prevalence.index for key in prevalence if pd.isna(prevalence.loc[site, key])
    ]
    assert unreported and all(attribution.loc[site, key] is None for site, key in unreported)


def test_the_models_own_errors_and_the_label_audits_are_listed(written: tuple[Path, StudyReport]) -> None:
    out, _ = written
    md = (out / "report.md").read_text(encoding="utf-8")
    profile = md[md.index("### The model's own systematic errors") : md.index("### Findings across sites")]
    lines = [line for line in profile.splitlines() if line.startswith("- ")]
    assert len(lines) == 1  # visceral fat on 4 of 18 slices is not systematic
    assert lines[0].startswith(
        "- muscle / site_excludes / boundary: the model adds tissue along the contours"
    )
    assert "15 of 18 internal test slices (95% CI 61%–94%)" in lines[0]
    audit = md[md.index("### Label audit (model-free)") : md.index("### Impact")]
    assert "| hospital-b | external | muscle | site_excludes | psoas | 7 of 8 slices" in audit
    assert "- hospital-g: no labelling convention: none of 2 checks over 6 slices" in audit
    with (out / "tables" / "label_audit.csv").open(encoding="utf-8", newline="") as handle:
        checks = list(csv.DictReader(handle))
    assert {(c["site"], c["region"], c["systematic"]) for c in checks} >= {
        ("hospital-b", "psoas", "True"),
        ("hospital-g", "psoas", "False"),
    }


def test_sites_without_a_role_are_pooled_together_as_before(tmp_path: Path) -> None:
    """A comparison of label sets has no role: one group, ``pooled`` rows and ``pooled_iou_bins.csv``."""
    report = study_report(with_training=False).model_copy(
        update={
            "task": "compare",
            "sites": [SiteResult(site=s, status="ok", payload=p) for s, p in two_sites().items()],
            "error_profile": None,
        }
    )
    report = report.model_copy(
        update={
            "sites": [
                s.model_copy(update={"payload": s.payload.model_copy(update={"task": "compare"})})  # type: ignore[union-attr]
                for s in report.sites
            ]
        }
    )
    paths = write_report(report, tmp_path)
    stored = StudyReport.model_validate_json(paths.json.read_text(encoding="utf-8"))
    assert stored.pooled is not None and [g.role for g in stored.pooled.groups] == [None]
    assert stored.pooled.groups[0].results.sites == ["hospital-a", "hospital-b"]
    assert {"pooled_iou_bins", "internal_external"} <= set(paths.tables)
    md = paths.markdown.read_text(encoding="utf-8")
    assert "## Sites at a glance" in md and "## Raw and protocol-applied prediction" not in md
    assert "| hospital-b | **88%** | 25% |" in md  # not attributed: no model in a comparison
    assert "hospital-b: leaving out psoas lowers this site's muscle area" in md


# --------------------------------------------------------------------------- a site that suppressed its bins

INCOMPLETE = "incomplete: 1 of 3 sites suppressed (hospital-c)"


@pytest.fixture(scope="module")
def suppressed_written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("suppressed")
    write_report(suppressed_study(), out)
    return out


def test_pooled_bins_with_a_suppressed_site_say_incomplete_in_every_format(suppressed_written: Path) -> None:
    """External hospital-c's policy suppressed its M, S and V bins: the pooled external bins are
    hospital-b's and -g's sums only. report.json, report.md and report.html must say the pooled
    external bins are incomplete and name hospital-c, never present them as counts over all three
    external sites; the internal group is untouched and complete."""
    out = suppressed_written
    data = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert data["schema_version"] == "4"
    groups = {g["role"]: g for g in data["pooled"]["groups"]}
    assert groups["external"]["tables"]["pooled_external_iou_bins"] == {
        "state": "incomplete",
        "sites": ["hospital-b", "hospital-g"],
        "suppressed": ["hospital-c"],
    }
    assert groups["internal"]["tables"]["pooled_internal_iou_bins"]["state"] == "complete"
    assert (groups["external"]["n_sites"], groups["external"]["n_slices"]) == (3, 8 + 6 + 10)
    results = groups["external"]["results"]
    assert results["withheld"]["scores.muscle.bins"] == ["hospital-c"]
    assert "scores.msv.bins" not in results["withheld"]  # hospital-c's MSV bins had no small cell
    # M's top bin: hospital-b 2 + hospital-g 1; hospital-c's 8 are not there, and its pixels are
    assert results["scores"]["muscle"]["bins"]["[0.9,1.0]"] == 2 + 1
    assert results["scores"]["muscle"]["union_px"] == 1000 * (8 + 6 + 10)
    for name in ("report.md", "report.html"):
        text = (out / name).read_text(encoding="utf-8")
        assert "counts summed over 3 sites" not in text.lower(), name
        caption = next(
            line
            for line in text.splitlines()
            if "pooled_external: external" in line and "Counts summed" in line
        )
        assert f"M, S, V: {INCOMPLETE}" in caption, (name, caption)
        assert "not over all 3 sites" in caption, (name, caption)
        assert f"pooled_external: {INCOMPLETE}." in text, name  # the IoU bins figure's pooled bar


def test_pooled_bins_csv_with_a_suppressed_site_computes_no_share(suppressed_written: Path) -> None:
    path = suppressed_written / "tables" / "pooled_external_iou_bins.csv"
    with path.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["ratio"] for row in rows] == ["incomplete"] * 5
    assert rows[0]["M"] == "3" and rows[0]["MSV"] == str(4 + 2 + 8)
    assert rows[0][COVERAGE_COLUMN] == f"M, S, V: {INCOMPLETE}; MSV: complete: all 3 sites"


def test_a_suppressed_site_shows_as_incomplete_in_its_group_at_a_glance(suppressed_written: Path) -> None:
    with (suppressed_written / "tables" / "internal_external.csv").open(
        encoding="utf-8", newline=""
    ) as handle:
        rows = {row["site"]: row for row in csv.DictReader(handle)}
    assert rows["pooled_external"][COVERAGE_COLUMN] == INCOMPLETE
    assert rows["pooled_internal"][COVERAGE_COLUMN] == "complete: all 2 sites"
    assert rows["hospital-c"]["m_defined"] == ""  # suppressed: not available, never 0
    assert rows["pooled_external"]["m_0.9-1.0"] == "3" and rows["pooled_external"]["m_defined"] == "14"
    md = (suppressed_written / "report.md").read_text(encoding="utf-8")
    glance = md[md.index("at a glance") : md.index("## Sites")]
    row = next(line for line in glance.splitlines() if line.startswith("| pooled_external |"))
    assert INCOMPLETE in row and "3/14 = 21%" in row
    assert "| hospital-c | external |" in glance and "suppressed" in glance


def test_every_pooled_row_and_caption_states_its_coverage() -> None:
    """In the document, each table with pooled rows says which sites each is over."""
    tables = [b for b in build_document(suppressed_study()) if isinstance(b, Table)]
    pooled_tables = [
        t for t in tables if "site" in t.frame.columns and t.frame["site"].str.startswith(POOLED).any()
    ]
    assert len(pooled_tables) == 4  # IoU summary, area, SMI, sarcopenia
    for table in pooled_tables:
        pooled_rows = table.frame[table.frame["site"].str.startswith(POOLED)]
        assert set(pooled_rows["site"]) == {"pooled_internal", "pooled_external"}, table.caption
        assert "Pooled rows: pooled_internal: " in table.caption, table.caption
        assert pooled_rows[COVERAGE_COLUMN].str.match("(in)?complete: ").all(), table.caption
    sarcopenia = next(t for t in pooled_tables if "cut-off set" in t.frame.columns)  # the name for people
    assert f"pooled_external: {INCOMPLETE}." in sarcopenia.caption
    site_c = sarcopenia.frame[sarcopenia.frame["site"] == "hospital-c"]
    assert site_c.empty  # hospital-c withheld its calls: no row, and the pooled row says so


def test_summary_line_of_a_pool_with_a_suppressed_site() -> None:
    lines = summary_lines(suppressed_study())
    assert "hospital-c: ok, external, 10/12 slices, muscle IoU >= 0.9 in suppressed" in lines
    assert lines[-1] == (
        "pooled external (3 sites, 24 slices, 21 patients): muscle IoU >= 0.9 in 3/14 (21%; 95% CI 8%-48%) "
        f"({INCOMPLETE})"
    )


# --------------------------------------------------------------------------- rendering on its own


def test_markdown_and_html_render_hand_made_blocks() -> None:
    frame = pd.DataFrame({"site": ["a|b"], "value": [0.12345], "n": [pd.NA]})
    blocks: list[Block] = [
        Heading("Title <1>", 1),
        Text("x & y"),
        Bullets(("one",)),
        Table(frame, "caption", highlight=pd.DataFrame({"site": [True], "value": [False], "n": [False]})),
        Image("fig", b"\x89PNG", "a figure"),
    ]
    md = render_markdown(blocks, {"fig": "figures/fig.png"})
    assert "# Title <1>" in md and "- one" in md
    assert "| **a\\|b** | 0.123 | - |" in md and "*caption*" in md
    assert "![a figure](figures/fig.png)" in md
    page = render_html(blocks, "t")
    assert "<h1>Title &lt;1&gt;</h1>" in page and "<p>x &amp; y</p>" in page
    assert '<td class="sys">a|b</td><td>0.123</td><td>-</td>' in page
    assert 'src="data:image/png;base64,iVBORw=="' in page


def test_area_rows_of_a_site_that_suppressed_an_area() -> None:
    a = payload("a", 10, BINS_A, seed=0, shift=0.0)
    b = payload("b", 10, BINS_A, seed=1, shift=1.0)
    b = b.model_copy(
        update={"areas": {**b.areas, "muscle": AreaAgreement(n=0)}, "suppressed": ["areas.muscle"]}
    )
    payloads = {"a": a, "b": b}
    table = area_table(payloads, [pool_payloads(payloads)]).set_index(["site", "tissue"])
    assert table.loc[("b", "muscle"), COVERAGE_COLUMN] == "suppressed"
    assert table.loc[("b", "visceral_fat"), COVERAGE_COLUMN] == ""
    pooled_muscle = table.loc[(POOLED, "muscle")]
    assert pooled_muscle["n"] == 10
    assert pooled_muscle[COVERAGE_COLUMN] == "incomplete: 1 of 2 sites suppressed (b)"
    assert pooled_muscle["pooling"].startswith("over slices of the group's sites that sent it")
    assert table.loc[(POOLED, "visceral_fat"), "pooling"].startswith("over slices of all sites")


def test_withheld_validation_and_dp_sgd_rounds_are_said_in_words() -> None:
    from protocols import keys
    from server.report.sentences import training_release_notes

    def round_(n: int, epsilon: float) -> RoundRecord:
        return RoundRecord(
            round=n, per_site={"site-a": {keys.VAL_WITHHELD: 1.0}, "site-b": {keys.DP_EPSILON: epsilon}}
        )

    report = study_report().model_copy(update={"training": [round_(1, 2.5), round_(2, 3.0)]})
    notes = training_release_notes(report)
    assert notes[0].startswith("site-a: validation metrics withheld in round(s) 1, 2")
    assert "min-val-patients" in notes[0]
    assert notes[1].startswith("site-b: trained with DP-SGD") and "epsilon 3 per round" in notes[1]


def test_convention_aware_training_is_stated_per_site_from_its_last_reply() -> None:
    from protocols import keys
    from server.report.sentences import training_release_notes

    share, slices = keys.convention_keys("psoas")
    b = {keys.CONVENTION_AWARE: 1.0, share: 0.171, slices: 12.0, keys.CONVENTION_WITHHELD: 1.0}
    rounds = [
        RoundRecord(round=1, per_site={"site-a": {keys.CONVENTION_AWARE: 1.0}, "site-b": {**b, share: 0.5}}),
        RoundRecord(round=2, per_site={"site-a": {keys.CONVENTION_AWARE: 1.0}, "site-b": b, "site-c": {}}),
    ]
    notes = training_release_notes(study_report().model_copy(update={"training": rounds}))
    assert notes == [
        "site-a: trained convention-aware (train.convention-aware): no adjustment: its labels follow the "
        "protocol as far as its audit can tell.",
        "site-b: trained convention-aware (train.convention-aware): psoas region ignored (17.1% of its "
        "labelled pixels, 12 training slices); in the federated mean it weighs 83% of its training "
        "slices (the share of its labelled pixels that still teach); an adjustment on fewer slices "
        "than its min-slices was withheld.",
    ]


def test_a_declared_convention_is_stated_as_declared_and_one_not_confirmed_as_not_applied() -> None:
    from protocols import keys
    from server.report.sentences import training_release_notes

    share, slices = keys.convention_keys("psoas")
    metrics = {
        keys.CONVENTION_AWARE: 1.0,
        share: 0.12,
        slices: 8.0,
        keys.convention_declared_key("psoas"): 1.0,
        keys.convention_declared_key("boundary"): 1.0,
    }
    rounds = [RoundRecord(round=1, per_site={"site-d": metrics})]
    notes = training_release_notes(study_report().model_copy(update={"training": rounds}))
    assert notes == [
        "site-d: trained convention-aware (train.convention-aware): psoas region ignored (12.0% of its "
        "labelled pixels, 8 training slices, declared in its site.toml); in the federated mean it weighs "
        "88% of its training slices (the share of its labelled pixels that still teach); its site.toml "
        "declares boundary, which its label audit did not confirm: not applied."
    ]


def test_the_appendix_says_which_device_and_precision_each_site_ran_the_model_on() -> None:
    """A site's payload names its compute (``protocols.compute``); the appendix shows it beside that
    site's identifiers, and says nothing for a site whose payload does not (an older sarcofed)."""
    report = study_report(with_training=False)
    first, *others = report.sites
    assert first.payload is not None and others
    ran = first.payload.model_copy(update={"compute": ComputeUsed(device="cuda", precision="bf16")})
    report = report.model_copy(update={"sites": [first.model_copy(update={"payload": ran}), *others]})
    blocks = build_document(report)
    md = render_markdown(blocks, {b.name: f"{b.name}.png" for b in blocks if isinstance(b, Image)})
    appendix = md.split("## Appendix: engineering detail")[1]
    lines = [line for line in appendix.splitlines() if "dataset fingerprint sha256:" in line]
    assert any(line.startswith(f"- {first.site}: ") and line.endswith("; ran on cuda bf16") for line in lines)
    assert sum("ran on" in line for line in lines) == 1


def test_polar_maps_of_many_sites_show_the_most_discordant_and_say_so() -> None:
    """Thirty sites once made a 400-inch figure (80 s to draw, 17 MB of HTML): past
    POLAR_MAX_SITES the figure keeps the sites with the most discordant area per slice."""
    from server.report.conventions import POLAR_MAX_SITES, conventions_section, discordant_per_slice

    report = study_report()
    base = next(s for s in report.sites if s.site == "hospital-b")
    assert base.payload is not None and base.payload.discrepancy is not None
    polar = base.payload.discrepancy.polar
    assert polar is not None
    extra = []
    for k in range(POLAR_MAX_SITES + 3):  # k = 0 the faintest map, the last the strongest
        scaled = polar.model_copy(
            update={
                "maps": {
                    key: [[v * (k + 1) for v in row] for row in grid] for key, grid in polar.maps.items()
                }
            }
        )
        discrepancy = base.payload.discrepancy.model_copy(update={"polar": scaled})
        name = f"extra-site-{k:02d}"
        payload = base.payload.model_copy(update={"site": name, "discrepancy": discrepancy})
        extra.append(base.model_copy(update={"site": name, "node_id": 200 + k, "payload": payload}))
    crowded = report.model_copy(update={"sites": [*report.sites, *extra]})
    images = [b for b in conventions_section(crowded) if isinstance(b, Image) and b.name == "polar_maps"]
    assert len(images) == 1
    svg = images[0].png.svg  # type: ignore[attr-defined]
    with_maps = [
        s for s in crowded.sites if s.payload and s.payload.discrepancy and s.payload.discrepancy.polar
    ]
    ranked = sorted(with_maps, key=lambda s: -discordant_per_slice(s.payload.discrepancy.polar))  # type: ignore[union-attr,arg-type]
    assert [s.site for s in ranked[:POLAR_MAX_SITES]] == [f"extra-site-{k:02d}" for k in range(8, 2, -1)]
    for site in ranked[:POLAR_MAX_SITES]:
        assert f"{site.site} (n=" in svg
    for site in ranked[POLAR_MAX_SITES:]:
        assert f"{site.site} (n=" not in svg
    assert (
        f"the {POLAR_MAX_SITES} of {len(with_maps)} sites with the most discordant area" in images[0].caption
    )
    # a study with few sites shows every one, with no such note
    few = [b for b in conventions_section(report) if isinstance(b, Image) and b.name == "polar_maps"]
    assert "Shown:" not in few[0].caption
