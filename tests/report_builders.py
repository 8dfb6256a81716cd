"""Study reports built by hand with known numbers, for the report and pooling tests.

:func:`study_report` is a training study: hospital-a and hospital-f trained the model
(internal, scored on their held-out test patients), hospital-b and hospital-g did not
(external, every slice); hospital-b leaves the psoas out of muscle (a site convention its
label audit shows), and the model adds a band along the muscle contours (its own systematic
error, in the error profile from the internal sites). :func:`two_sites` is hospital-a and
hospital-b without a role, for the pooling arithmetic. ``python tests/test_report.py``
rewrites the example files in tests/data/report/ from them.
"""

from __future__ import annotations

import numpy as np

from common.stats import wilson_interval
from protocols.classes import IOU_BINS, METRIC_CLASSES, TISSUES
from protocols.findings import AuditCheck, ErrorProfile, Finding, KeyStats, LabelAudit
from protocols.payloads import (
    AreaAgreement,
    ClassScores,
    DiscrepancySummary,
    Distribution,
    EvaluationPayload,
    PolarMap,
    Role,
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
BINS_F: dict[str, tuple[int, ...]] = {
    "muscle": (7, 1, 0, 0, 0),
    "subcutaneous_fat": (8, 0, 0, 0, 0),
    "visceral_fat": (6, 2, 0, 0, 0),
    "msv": (7, 1, 0, 0, 0),
}
BINS_G: dict[str, tuple[int, ...]] = {
    "muscle": (1, 2, 2, 1, 0),
    "subcutaneous_fat": (5, 1, 0, 0, 0),
    "visceral_fat": (4, 1, 1, 0, 0),
    "msv": (2, 3, 1, 0, 0),
}
#: The raw prediction's muscle and MSV bins (before the protocol's HU ranges): worse than protocol-applied.
RAW: dict[str, dict[str, tuple[int, ...]]] = {
    "hospital-a": {"muscle": (5, 3, 2, 0, 0), "msv": (7, 2, 1, 0, 0)},
    "hospital-f": {"muscle": (4, 3, 1, 0, 0), "msv": (6, 2, 0, 0, 0)},
    "hospital-b": {"muscle": (1, 2, 3, 2, 0), "msv": (3, 3, 2, 0, 0)},
    "hospital-g": {"muscle": (0, 2, 2, 2, 0), "msv": (1, 3, 2, 0, 0)},
    "hospital-c": {"muscle": (6, 2, 2, 0, 0), "msv": (7, 2, 1, 0, 0)},
}


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
    site: str,
    n: int,
    bins: dict[str, tuple[int, ...]],
    seed: int,
    shift: float,
    *,
    role: Role | None = None,
    iou_mean: float | None = None,
) -> EvaluationPayload:
    """One site's payload; with a role, an evaluation of the study model: an internal site scored on
    its test split (n + 2 rows of 5 (n + 2) listed), with raw scores beside (:data:`RAW`)."""
    diffs = site_diffs(seed, n, shift)
    smi_diff = diffs["muscle"] / 2.9
    mean = 0.9 - 0.1 * seed if iou_mean is None else iou_mean
    class_scores = {c: scores(bins[c], mean, 0.05, 900 * n, 1000 * n) for c in METRIC_CLASSES}
    raw = None
    if role is not None:
        raw = class_scores | {
            c: scores(b, mean - 0.04, 0.06, 850 * n, 1000 * n) for c, b in RAW.get(site, {}).items()
        }
    return EvaluationPayload(
        task="evaluate",
        site=site,
        dataset_fingerprint=f"sha256:{site}-0123456789abcdef",
        model_hash="f00dfeed12345678",
        n_listed=5 * (n + 2) if role == "internal" else n + 2,
        n_used=n,
        n_groups=n - 1,
        role=role,
        split="test" if role == "internal" else "all",
        n_in_split=n + 2 if role == "internal" else None,
        raw_scores=raw,
        excluded={"missing_file": 1, "not_axial": 1},
        scores=class_scores,
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
            unknown=max(n - 6 - 2 * seed, 0),  # a site of fewer slices: the calls are for 6
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


def _wilson(k: int, n: int) -> dict[str, float]:
    low, high = wilson_interval(k, n)
    return {"prevalence_low": low, "prevalence_high": high}


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


PSOAS_EVIDENCE = (
    "label audit: Muscle-density tissue beside the vertebral body (psoas) is left out on 7 of 8 slices "
    "(95% CI 53%-98%; mean 11.8 cm² per slice): a labelling convention of this site, unlike the alberta "
    "protocol. Model profile: not seen on the internal test slices."
)


def attributed_psoas(n: int) -> Finding:
    """hospital-b's psoas finding as the coordinator attributes it: the site's convention."""
    return psoas_finding(n).model_copy(
        update={
            "n_present": 7,
            **_wilson(7, n),
            "mean_net_area_cm2": 12.1,
            "net_area_low_cm2": 9.8,
            "net_area_high_cm2": 14.4,
            "smi_shift_mean": 4.3,
            "smi_shift_low": 3.4,
            "smi_shift_high": 5.2,
            "calls_changed": 2,
            "calls_known": 8,
            "attribution": "site_convention",
            "evidence": PSOAS_EVIDENCE,
        }
    )


def attributed_boundary(n: int, k: int, systematic: bool) -> Finding:
    """The model's band along the muscle contours (the labels follow the protocol there)."""
    return Finding.model_validate(
        {
            "class": "muscle",
            "direction": "site_excludes",
            "region": "boundary",
            "prevalence": k / n,
            "mean_area_share": 0.03,
            "mean_area_cm2": 2.1,
            "density_consistency": 0.55,
            "systematic": systematic,
            "n_slices": n,
            "sentence": "The site's muscle contours run inside the model's.",
            "n_present": k,
            **_wilson(k, n),
            "mean_net_area_cm2": 1.9,
            "net_area_low_cm2": 1.2,
            "net_area_high_cm2": 2.6,
            "attribution": "model",
            "evidence": f"the label audit finds this site's labels following the protocol here (0 of {n} "
            "slices deviate), so the difference is the model's. Model profile: on the internal test "
            f"slices the model shows it on 15 of 18, here on {k} of {n} (one-sided Fisher p = 0.5).",
        }
    )


def audit_check(region: str, direction: str, k: int, n: int, cm2: float, sentence: str) -> AuditCheck:
    low, high = wilson_interval(k, n)
    return AuditCheck.model_validate(
        {
            "class": "muscle",
            "direction": direction,
            "region": region,
            "n_slices": n,
            "n_present": k,
            "prevalence": k / n,
            "prevalence_low": low,
            "prevalence_high": high,
            "systematic": low > 0.5,
            "conforms": high < 0.5,
            "mean_area_cm2": cm2,
            "mean_area_share": cm2 / 150.0,
            "sentence": sentence,
        }
    )


def label_audit(n: int, psoas_left_out: bool) -> LabelAudit:
    """A site's label audit: the psoas check shows the convention or conforms, the contours conform."""
    psoas = (
        audit_check(
            "psoas",
            "site_excludes",
            7,
            n,
            11.8,
            "Muscle-density tissue beside the vertebral body (psoas) is left out on 7 of 8 slices "
            "(95% CI 53%-98%; mean 11.8 cm² per slice): a labelling convention of this site, unlike the "
            "alberta protocol.",
        )
        if psoas_left_out
        else audit_check("psoas", "site_excludes", 0, n, 0.0, "The labels follow the alberta protocol here.")
    )
    contours = audit_check(
        "boundary", "site_excludes", 0, n, 0.0, "The labels follow the alberta protocol here."
    )
    return LabelAudit(protocol="alberta", n_slices=n, checks=[psoas, contours])


def error_profile() -> ErrorProfile:
    """The model's errors on hospital-a's and hospital-f's test slices: a band along the muscle contours
    on 15 of 18 (systematic), visceral fat left out on 4 of 18 (not)."""
    return ErrorProfile(
        source="the model against protocol-following labels on the held-out test patients of 2 internal "
        "site(s) (18 slices)",
        n_sites=2,
        n_slices=18,
        key_stats={
            "muscle:site_excludes:boundary": KeyStats(
                n=18,
                n_present=15,
                sum_net_share=0.54,
                sum_sq_net_share=0.02,
                sum_net_cm2=36.0,
                sum_sq_net_cm2=90.0,
            ),
            "visceral_fat:site_excludes:other": KeyStats(
                n=18,
                n_present=4,
                sum_net_share=0.05,
                sum_sq_net_share=0.01,
                sum_net_cm2=4.0,
                sum_sq_net_cm2=9.0,
            ),
        },
    )


def hospital_a(role: Role | None = None) -> EvaluationPayload:
    found = [boundary_finding(10, 0.1)]
    return payload("hospital-a", 10, BINS_A, seed=0, shift=0.5, role=role).model_copy(
        update={
            "discrepancy": DiscrepancySummary(n_slices=10, findings=found, polar=polar(10)),
            "findings": found,
            "label_audit": label_audit(10, psoas_left_out=False) if role else None,
        }
    )


def hospital_b(role: Role | None = None) -> EvaluationPayload:
    found = [psoas_finding(8), boundary_finding(8, 0.25)]
    return payload("hospital-b", 8, BINS_B, seed=1, shift=-4.0, role=role).model_copy(
        update={
            "discrepancy": DiscrepancySummary(n_slices=8, findings=found, polar=polar(8)),
            "findings": found,
            "harmonised_scores": {c: scores((6, 2, 0, 0, 0), 0.92, 0.03, 7000, 7500) for c in METRIC_CLASSES},
            "label_audit": label_audit(8, psoas_left_out=True) if role else None,
        }
    )


def two_sites() -> dict[str, EvaluationPayload]:
    """hospital-a and hospital-b without a role (pooled together, as a comparison of label sets is)."""
    return {"hospital-a": hospital_a(), "hospital-b": hospital_b()}


def study_report(with_training: bool = True) -> StudyReport:
    """A training study: internal hospital-a and -f, external hospital-b and -g, three unusable sites."""
    a, b = hospital_a("internal"), hospital_b("external")
    f = payload("hospital-f", 8, BINS_F, seed=0, shift=0.3, role="internal", iou_mean=0.86)
    f = f.model_copy(update={"discrepancy": DiscrepancySummary(n_slices=8, findings=[])})
    g = payload("hospital-g", 6, BINS_G, seed=0, shift=2.0, role="external", iou_mean=0.7)
    g = g.model_copy(update={"label_audit": label_audit(6, psoas_left_out=False)})
    empty = EvaluationPayload(
        task="evaluate",
        site="hospital-d",
        dataset_fingerprint="sha256:hospital-d-fedcba",
        model_hash="f00dfeed12345678",
        n_listed=5,
        n_used=0,
        n_groups=0,
        role="external",
        excluded={"not_ct": 5},
        scores={},
        areas={},
    )
    training = [
        RoundRecord(
            round=r,
            sites_sent=["hospital-a", "hospital-f"],
            sites_replied=["hospital-a", "hospital-f"],
            pooled_val_loss=loss,
            pooled_val_iou={"muscle": 0.8 + 0.03 * r},
            per_site={"hospital-a": {"val-loss": loss - 0.05}, "hospital-f": {"val-loss": loss + 0.07}},
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
        error_profile=error_profile(),
        sites=[
            SiteResult(
                site="hospital-a",
                node_id=11,
                status="ok",
                role="internal",
                payload=a,
                findings=[attributed_boundary(10, 1, systematic=False)],
            ),
            SiteResult(
                site="hospital-f",
                node_id=16,
                status="ok",
                role="internal",
                payload=f,
                findings=[attributed_boundary(8, 8, systematic=True)],
            ),
            SiteResult(
                site="hospital-b",
                node_id=12,
                status="ok",
                role="external",
                payload=b,
                findings=[attributed_psoas(8), attributed_boundary(8, 2, systematic=False)],
            ),
            SiteResult(site="hospital-g", node_id=17, status="ok", role="external", payload=g),
            SiteResult(
                site="hospital-c",
                node_id=13,
                status="failed",
                role="external",
                reason="ClientApp raised: disk full",
            ),
            SiteResult(
                site="hospital-d",
                node_id=14,
                status="no_usable_slices",
                role="external",
                reason="no usable slice; excluded: {'not_ct': 5}",
                payload=empty,
            ),
            SiteResult(
                site="hospital-e",
                node_id=15,
                status="timeout",
                role="external",
                reason="no reply within 900 s",
            ),
        ],
        training=training if with_training else [],
        notes=["demo data (synthetic phantoms)"],
    )


def top_bin_study(sites: dict[str, tuple[int, int, Role]]) -> StudyReport:
    """A study of sites given as site -> (slices at muscle IoU >= 0.9, slices, role); every other slice
    in [0.8, 0.9), every class alike; no findings, no error profile (for the verdict rules)."""
    results = []
    for i, (site, (k, n, role)) in enumerate(sites.items()):
        bins: dict[str, tuple[int, ...]] = {c: (k, n - k, 0, 0, 0) for c in METRIC_CLASSES}
        p = payload(site, n, bins, seed=0, shift=0.0, role=role)
        results.append(SiteResult(site=site, node_id=i, status="ok", role=role, payload=p))
    return study_report(with_training=False).model_copy(update={"sites": results, "error_profile": None})


def suppressed_study() -> StudyReport:
    """The usable sites of :func:`study_report` and external hospital-c, whose policy (min-cell-count 2)
    suppressed its bins, as the guard does.

    hospital-c has single-slice bins in every class, so ``client.guard.suppress_payload``
    empties them and names ``scores.<class>.bins`` in ``suppressed``.
    """
    from client.guard import suppress_payload
    from client.policy import SitePolicy

    c = payload("hospital-c", 10, BINS_A, seed=0, shift=1.0, role="external")
    data, marks = suppress_payload(c, SitePolicy.model_validate({"min-cell-count": 2}))
    data["suppressed"] = [*data["suppressed"], *marks]
    suppressed = EvaluationPayload.model_validate(data)
    assert "scores.muscle.bins" in suppressed.suppressed and suppressed.scores["muscle"].bins == {}
    full = study_report(with_training=False)
    sites = [s for s in full.sites if s.status == "ok"]
    sites.append(SiteResult(site="hospital-c", node_id=13, status="ok", role="external", payload=suppressed))
    return full.model_copy(update={"sites": sites, "notes": []})
