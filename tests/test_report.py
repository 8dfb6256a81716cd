"""The study report: pooling from payloads, the seed table, and the four output formats.

Payloads are built by hand with known numbers. ``python tests/test_report.py`` rewrites the
example files in tests/data/report/ from the same builders.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from protocols.classes import IOU_BINS, METRIC_CLASSES, TISSUES
from protocols.findings import Finding
from protocols.payloads import (
    AreaAgreement,
    ClassScores,
    DiscrepancySummary,
    Distribution,
    EvaluationPayload,
    PolarMap,
    SarcopeniaConfusion,
    SmiAgreement,
)
from protocols.report import RoundRecord, SiteResult, StudyReport
from server.report import (
    NOT_POOLABLE,
    POOLED,
    area_table,
    file_stem,
    finding_key,
    iou_summary_table,
    pool_payloads,
    pool_sarcopenia,
    seed_table,
    summary_lines,
    usable_payloads,
    write_report,
)

DATA = Path(__file__).parent / "data" / "report"

# Bins per class, best first: (>=0.9, 0.8-0.9, 0.7-0.8, <0.7), and undefined.
BINS_A = {"muscle": (8, 1, 1, 0, 0), "subcutaneous_fat": (9, 1, 0, 0, 0), "visceral_fat": (6, 2, 1, 0, 1)}
BINS_A["msv"] = (8, 2, 0, 0, 0)
BINS_B = {"muscle": (2, 3, 2, 1, 0), "subcutaneous_fat": (7, 1, 0, 0, 0), "visceral_fat": (5, 2, 1, 0, 0)}
BINS_B["msv"] = (4, 3, 1, 0, 0)


def scores(bins: tuple[int, ...], mean: float, sd: float, inter: int, union: int) -> ClassScores:
    n = sum(bins[:4])
    return ClassScores(
        bins=dict(zip(IOU_BINS, bins[:4], strict=True)),
        undefined=bins[4],
        iou=Distribution(n=n, mean=mean, sd=sd, median=mean, q1=mean - sd, q3=mean + sd),
        dice=Distribution(n=n, mean=min(1.0, mean + 0.03), sd=sd),
        intersection_px=inter,
        union_px=union,
    )


def agreement(diffs: np.ndarray, label_mean: float) -> AreaAgreement:
    return AreaAgreement(
        n=len(diffs),
        mean_label_cm2=label_mean,
        mean_test_cm2=label_mean + float(diffs.mean()),
        mean_diff_cm2=float(diffs.mean()),
        sd_diff_cm2=float(diffs.std(ddof=1)),
        sum_diff_cm2=float(diffs.sum()),
        sum_sq_diff_cm2=float(np.square(diffs).sum()),
        mean_hu_label=35.0,
        mean_hu_test=33.0,
    )


def site_diffs(seed: int, n: int, shift: float) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {t: rng.normal(shift * (i + 1), 3.0 + i, size=n) for i, t in enumerate(TISSUES)}


def payload(
    site: str, n: int, bins: dict[str, tuple[int, ...]], seed: int, shift: float
) -> EvaluationPayload:
    diffs = site_diffs(seed, n, shift)
    smi_diff = diffs["muscle"] / 2.9
    return EvaluationPayload(
        task="evaluate",
        site=site,
        dataset_fingerprint=f"sha256:{site}-0123456789abcdef",
        model_hash="f00dfeed12345678",
        n_listed=n + 2,
        n_used=n,
        n_groups=n - 1,
        excluded={"missing_file": 1, "not_axial": 1},
        scores={c: scores(bins[c], 0.9 - 0.1 * seed, 0.05, 900 * n, 1000 * n) for c in METRIC_CLASSES},
        areas={t: agreement(diffs[t], 150.0 - 30 * i) for i, t in enumerate(TISSUES)},
        smi=SmiAgreement(
            n=n,
            mean_label=45.0,
            mean_test=45.0 + float(smi_diff.mean()),
            mean_diff=float(smi_diff.mean()),
            sd_diff=float(smi_diff.std(ddof=1)),
            sum_diff=float(smi_diff.sum()),
            sum_sq_diff=float(np.square(smi_diff).sum()),
        ),
        sarcopenia=SarcopeniaConfusion(
            cutoff_set="prado2008",
            both_sarcopenic=seed + 2,
            label_only=1,
            test_only=seed,
            neither=3,
            unknown=n - 6 - 2 * seed,
        ),
    )


def polar(n_slices: int) -> PolarMap:
    angles, radii = np.meshgrid(np.arange(16), np.arange(5), indexing="ij")
    # psoas-like: two posterior lobes near the spine (angles around 5 and 11 of 16), mid radius.
    bump = np.exp(-((angles - 5) ** 2) / 2.0) + np.exp(-((angles - 11) ** 2) / 2.0)
    excl = (bump * np.exp(-((radii - 2) ** 2) / 1.5) * 2.0 * n_slices).round(3)
    incl = np.full((16, 5), 0.02 * n_slices).round(3)
    return PolarMap(
        n_angle=16,
        n_radius=5,
        n_slices=n_slices,
        maps={"muscle:site_excludes": excl.tolist(), "muscle:site_includes": incl.tolist()},
    )


def psoas_finding(n: int) -> Finding:
    return Finding.model_validate(
        {
            "class": "muscle",
            "direction": "site_excludes",
            "region": "psoas",
            "prevalence": 0.875,
            "mean_area_share": 0.08,
            "mean_area_cm2": 12.4,
            "density_consistency": 0.93,
            "systematic": True,
            "n_slices": n,
            "sentence": "The site leaves out psoas from muscle on 7 of 8 slices.",
        }
    )


def boundary_finding(n: int, prevalence: float) -> Finding:
    return Finding.model_validate(
        {
            "class": "muscle",
            "direction": "site_includes",
            "region": "boundary",
            "prevalence": prevalence,
            "mean_area_share": 0.01,
            "mean_area_cm2": 1.2,
            "density_consistency": 0.4,
            "systematic": False,
            "n_slices": n,
            "sentence": "Contours are slightly wider.",
        }
    )


def study_report(with_training: bool = True) -> StudyReport:
    a = payload("hospital-a", 10, BINS_A, seed=0, shift=0.5)
    b = payload("hospital-b", 8, BINS_B, seed=1, shift=-4.0)
    b_findings = [psoas_finding(8), boundary_finding(8, 0.25)]
    b = b.model_copy(
        update={
            "discrepancy": DiscrepancySummary(n_slices=8, findings=b_findings, polar=polar(8)),
            "findings": b_findings,
            "harmonised_scores": {c: scores((6, 2, 0, 0, 0), 0.92, 0.03, 7000, 7500) for c in METRIC_CLASSES},
        }
    )
    a_findings = [boundary_finding(10, 0.1)]
    a = a.model_copy(
        update={
            "discrepancy": DiscrepancySummary(n_slices=10, findings=a_findings, polar=polar(10)),
            "findings": a_findings,
        }
    )
    empty = EvaluationPayload(
        task="evaluate",
        site="hospital-d",
        dataset_fingerprint="sha256:hospital-d-fedcba",
        model_hash="f00dfeed12345678",
        n_listed=5,
        n_used=0,
        n_groups=0,
        excluded={"not_ct": 5},
        scores={},
        areas={},
    )
    training = [
        RoundRecord(
            round=r,
            sites_sent=["hospital-a", "hospital-b"],
            sites_replied=["hospital-a", "hospital-b"],
            pooled_val_loss=loss,
            pooled_val_iou={"muscle": 0.8 + 0.03 * r},
            per_site={"hospital-a": {"val-loss": loss - 0.05}, "hospital-b": {"val-loss": loss + 0.07}},
            weights_hash=f"{r:02d}abcdef0123",
            start_weights_hash=f"{r - 1:02d}abcdef0123",
            improved=True,
            seconds=12.5,
        )
        for r, loss in ((1, 0.9), (2, 0.6), (3, 0.45))
    ]
    return StudyReport(
        sarcofed_version="0.1.0",
        created="2025-05-01T10:00:00+00:00",
        run_id="42",
        study_name="demo-study",
        task="evaluate",
        model_hash="f00dfeed12345678",
        model_spec={"arch": "unet", "encoder": "resnet34", "in_channels": 1, "classes": 4, "image_size": 128},
        cutoff_set="prado2008",
        sites=[
            SiteResult(site="hospital-a", node_id=11, status="ok", payload=a),
            SiteResult(site="hospital-b", node_id=12, status="ok", payload=b),
            SiteResult(site="hospital-c", node_id=13, status="failed", reason="ClientApp raised: disk full"),
            SiteResult(
                site="hospital-d",
                node_id=14,
                status="no_usable_slices",
                reason="no usable slice; excluded: {'not_ct': 5}",
                payload=empty,
            ),
            SiteResult(site="hospital-e", node_id=15, status="timeout", reason="no reply within 900 s"),
        ],
        training=training if with_training else [],
        notes=["demo data (synthetic phantoms)"],
    )


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
    assert stored == study_report()


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


def test_only_ok_sites_with_slices_are_pooled() -> None:
    assert list(usable_payloads(study_report())) == ["hospital-a", "hospital-b"]


def test_pooled_seed_table_is_the_hand_added_counts() -> None:
    pooled = pool_payloads(usable_payloads(study_report()))
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
    pooled = pool_payloads(usable_payloads(study_report()))
    for tissue in TISSUES:
        all_diffs = np.concatenate([parts["a"][tissue], parts["b"][tissue]])
        area = pooled.areas[tissue]
        assert area.n == 18
        assert area.mean_diff_cm2 == pytest.approx(all_diffs.mean(), rel=1e-12)
        assert area.sd_diff_cm2 == pytest.approx(all_diffs.std(ddof=1), rel=1e-10)
    table = area_table({POOLED: pooled.areas}).set_index("tissue")
    muscle = np.concatenate([parts["a"]["muscle"], parts["b"]["muscle"]])
    low = muscle.mean() - 1.96 * muscle.std(ddof=1)
    high = muscle.mean() + 1.96 * muscle.std(ddof=1)
    assert table.loc["muscle", "loa_low_cm2"] == pytest.approx(low, rel=1e-10)
    assert table.loc["muscle", "loa_high_cm2"] == pytest.approx(high, rel=1e-10)
    smi_all = np.concatenate([parts["a"]["muscle"], parts["b"]["muscle"]]) / 2.9
    assert pooled.smi is not None
    assert pooled.smi.sd_diff == pytest.approx(smi_all.std(ddof=1), rel=1e-10)


def test_pooled_iou_mean_is_weighted_and_median_not_poolable() -> None:
    pooled = pool_payloads(usable_payloads(study_report()))
    muscle = pooled.scores["muscle"]
    assert muscle.iou.n == 18
    assert muscle.iou.mean == pytest.approx((10 * 0.9 + 8 * 0.8) / 18)
    assert muscle.iou.median is None
    assert muscle.intersection_px == 900 * 18 and muscle.union_px == 1000 * 18
    summary = iou_summary_table({POOLED: pooled.scores})
    assert set(summary["iou_median"]) == {NOT_POOLABLE}


def test_sarcopenia_counts_add_and_mixed_cut_offs_refuse() -> None:
    pooled = pool_payloads(usable_payloads(study_report()))
    assert pooled.sarcopenia is not None
    assert (pooled.sarcopenia.both_sarcopenic, pooled.sarcopenia.test_only) == (2 + 3, 0 + 1)
    korean = pooled.sarcopenia.model_copy(update={"cutoff_set": "korean"})
    with pytest.raises(ValueError, match="different cut-off sets"):
        pool_sarcopenia([pooled.sarcopenia, korean])


def test_file_stems_are_safe_and_unique() -> None:
    taken: set[str] = set()
    assert file_stem("Hospital B/ICU", taken) == "Hospital_B_ICU"
    assert file_stem("Hospital B ICU", taken) == "Hospital_B_ICU-2"
    assert file_stem("pooled", taken) == "site-pooled"
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
    assert StudyReport.model_validate_json((out / "report.json").read_text(encoding="utf-8")) == report


def test_csv_tables_per_site_and_pooled(written: tuple[Path, StudyReport]) -> None:
    out, _ = written
    names = {p.name for p in (out / "tables").glob("*.csv")}
    expected = {"hospital-a_iou_bins.csv", "hospital-b_iou_bins.csv", "pooled_iou_bins.csv", "sites.csv"}
    expected |= {"area_agreement.csv", "smi_agreement.csv", "sarcopenia_confusion.csv", "findings.csv"}
    assert expected <= names
    with (out / "tables" / "pooled_iou_bins.csv").open(encoding="utf-8", newline="") as handle:
        pooled = list(csv.reader(handle))
    assert pooled[0] == ["IoU", "M", "S", "V", "MSV", "ratio"]
    assert pooled[1] == ["[0.9,1.0]", "10", "16", "11", "12", "49/71 (69%)"]


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
    assert page.count('src="data:image/png;base64,') >= 6
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
    assert "hospital-b: leaving out psoas lowers this site's muscle area by 12.4 cm² per slice" in md
    assert "M harmonised" in md


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
    assert lines[0].startswith("study demo-study (run 42): evaluate, model f00dfeed1234")
    assert "training: 3 round(s), last round 3 pooled val loss 0.450" in lines
    assert "hospital-a: ok, 10/12 slices, muscle IoU >= 0.9 in 8/10 (80%)" in lines
    assert any(line.startswith("hospital-b: ok") and "muscle/site_excludes/psoas" in line for line in lines)
    assert "hospital-c: failed - ClientApp raised: disk full" in lines
    assert lines[-1] == "pooled (2 sites, 18 slices): muscle IoU >= 0.9 in 10/18 (56%)"


def _write_examples() -> None:  # pragma: no cover - run by hand
    DATA.mkdir(parents=True, exist_ok=True)
    (DATA / "evaluate_with_training.json").write_text(
        study_report().model_dump_json(indent=2) + "\n", "utf-8"
    )
    full = study_report(with_training=False)
    minimal = full.model_copy(
        update={
            "task": "compare",
            "model_hash": None,
            "model_spec": None,
            "cutoff_set": "korean",
            "sites": [s.model_copy(update={"payload": None}) for s in full.sites if s.status != "ok"],
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


def test_findings_most_sites_share_are_attributed_to_the_reference_not_the_sites() -> None:
    from server.report import attribute_findings, attribution_lines

    def with_findings(site: str, findings: list[Finding]) -> EvaluationPayload:
        base = payload(site, 8, BINS_A, seed=0, shift=0.0)
        summary = DiscrepancySummary(n_slices=8, findings=findings)
        return base.model_copy(update={"discrepancy": summary, "findings": findings})

    imat = psoas_finding(8).model_copy(update={"region": "intramuscular_fat", "direction": "site_excludes"})
    psoas_in = psoas_finding(8).model_copy(update={"direction": "site_includes"})
    payloads = {
        # a and c include psoas where the model does not; b agrees with the model (b leaves psoas out)
        "hospital-a": with_findings("hospital-a", [imat, psoas_in]),
        "hospital-b": with_findings("hospital-b", [imat, psoas_finding(8)]),
        "hospital-c": with_findings("hospital-c", [psoas_in, boundary_finding(8, 0.3)]),  # scattered: ignored
    }
    attributed = attribute_findings(payloads)
    assert attributed["hospital-a"] == {finding_key(imat): "shared", finding_key(psoas_in): "shared"}
    assert attributed["hospital-b"][finding_key(psoas_finding(8))] == "site"
    lines = attribution_lines(payloads, "evaluate")
    assert any("2 of 3 sites" in line and "psoas" in line and "model" in line for line in lines)
    assert any(line.startswith("hospital-b: unlike the other sites") and "psoas" in line for line in lines)
    assert any(
        line.startswith("hospital-c: unlike the other sites") and "intramuscular" in line for line in lines
    )
    # A single site cannot be compared with anyone: nothing is called shared.
    assert set(attribute_findings({"a": payloads["hospital-b"]})["a"].values()) == {"site"}


def test_a_training_only_study_writes_its_report(tmp_path: Path) -> None:
    """study.mode=train validates nowhere: no site rows, but the rounds must still be reported."""
    report = study_report(with_training=True).model_copy(update={"sites": []})
    paths = write_report(report, tmp_path)
    assert "Training rounds" in paths.markdown.read_text()
    assert StudyReport.model_validate_json(paths.json.read_text()).training == report.training
