"""Study reports built by hand with known numbers, for the report and pooling tests.

``python tests/test_report.py`` rewrites the example files in tests/data/report/ from
:func:`study_report`.
"""

from __future__ import annotations

import numpy as np

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

# Bins per class, best first: (>=0.9, 0.8-0.9, 0.7-0.8, <0.7), and undefined.
BINS_A: dict[str, tuple[int, ...]] = {
    "muscle": (8, 1, 1, 0, 0),
    "subcutaneous_fat": (9, 1, 0, 0, 0),
    "visceral_fat": (6, 2, 1, 0, 1),
}
BINS_A["msv"] = (8, 2, 0, 0, 0)
BINS_B: dict[str, tuple[int, ...]] = {
    "muscle": (2, 3, 2, 1, 0),
    "subcutaneous_fat": (7, 1, 0, 0, 0),
    "visceral_fat": (5, 2, 1, 0, 0),
}
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


def suppressed_study() -> StudyReport:
    """Three usable sites; hospital-c's policy (min-cell-count 2) suppressed its bins, as the guard does.

    hospital-c has single-slice bins in every class, so ``client.guard.suppress_payload``
    empties them and names ``scores.<class>.bins`` in ``suppressed``.
    """
    from client.guard import suppress_payload
    from client.policy import SitePolicy

    c = payload("hospital-c", 10, BINS_A, seed=0, shift=1.0)
    data, marks = suppress_payload(c, SitePolicy.model_validate({"min-cell-count": 2}))
    data["suppressed"] = [*data["suppressed"], *marks]
    suppressed = EvaluationPayload.model_validate(data)
    assert "scores.muscle.bins" in suppressed.suppressed and suppressed.scores["muscle"].bins == {}
    full = study_report(with_training=False)
    sites = [s for s in full.sites if s.status == "ok"]
    sites.append(SiteResult(site="hospital-c", node_id=13, status="ok", payload=suppressed))
    return full.model_copy(update={"sites": sites, "notes": []})
