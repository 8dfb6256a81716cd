"""Site guard: refusals (audited), suppression marked in ``suppressed``, schema-only replies."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from guard_sites import APP, guard, small_site

from client.audit import audit_path, read_audit
from client.guard import (
    SiteRefusal,
    clip_and_noise,
    config_refusal,
    never_leave,
    open_guard,
    redact,
    suppress_payload,
)
from client.policy import SitePolicy, WeightsDp, write_policy
from common.dataset import load_site
from common.evaluation import SliceRecord, score_slice
from protocols import keys
from protocols.classes import IOU_BINS
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

#: The payload's real IoU bin names (muscle IoU >= 0.9, 0.8-0.9).
TOP, SECOND = IOU_BINS[:2]


def _scores(bins: dict[str, int], undefined: int = 0) -> ClassScores:
    n = sum(bins.values())
    return ClassScores(
        bins=bins,
        undefined=undefined,
        iou=Distribution(n=n, mean=0.9, median=0.9),
        dice=Distribution(n=n, mean=0.95),
        intersection_px=900,
        union_px=1000,
    )


def _records(n: int = 12) -> list[SliceRecord]:
    """Per-slice records of ``n`` patients (kept at the site; the guard needs their patients)."""
    label = np.array([[1, 1, 2, 0], [1, 1, 2, 0], [3, 3, 2, 0], [0, 0, 0, 0]], dtype=np.uint8)
    hu = np.zeros(label.shape, dtype=np.float32)
    return [
        score_slice(label, label, hu, (10.0, 10.0), group=f"patient-{i}", height_m=1.7, sex="M")
        for i in range(n)
    ]


#: the slices the payloads below summarise, one per patient
RECORDS = _records()


def payload(n_used: int = 12) -> EvaluationPayload:
    finding = Finding.model_validate(
        {
            "class": "muscle",
            "direction": "site_excludes",
            "region": "psoas",
            "prevalence": 0.2,
            "mean_area_share": 0.1,
            "mean_area_cm2": 3.0,
            "density_consistency": 0.9,
            "systematic": False,
            "n_slices": 2,
            "sentence": "The site leaves out psoas in 2 slices.",
        }
    )
    polar = PolarMap(n_angle=2, n_radius=1, n_slices=n_used, maps={"muscle:site_excludes": [[1.0], [0.0]]})
    return EvaluationPayload(
        task="evaluate",
        site="hospital-b",
        dataset_fingerprint="f" * 16,
        n_listed=n_used + 1,
        n_used=n_used,
        n_groups=n_used,
        excluded={"unreadable_image": 1},
        scores={"muscle": _scores({TOP: 10, SECOND: 2}), "visceral_fat": _scores({TOP: 12})},
        areas={"muscle": AreaAgreement(n=n_used, mean_label_cm2=150.0, sum_diff_cm2=3.0)},
        smi=SmiAgreement(n=3, mean_label=45.0),
        sarcopenia=SarcopeniaConfusion(
            cutoff_set="prado2008", both_sarcopenic=1, label_only=0, test_only=0, neither=2, unknown=9
        ),
        discrepancy=DiscrepancySummary(n_slices=n_used, findings=[finding], polar=polar),
        findings=[finding],
    )


@pytest.fixture
def site(tmp_path: Path) -> Path:
    return small_site(
        tmp_path / "hospital-b",
        "image,label,group\nimages/CANARY-PATIENT-001.dcm,labels/x.png,CANARY-GROUP-7\n",
    )


def events(site: Path) -> list[tuple[str, str | None]]:
    return [(e.event, e.detail) for e in read_audit(audit_path(site))]


def _without_quantiles(p: EvaluationPayload) -> EvaluationPayload:
    scores = {
        c: s.model_copy(
            update={
                d: getattr(s, d).model_copy(update=dict.fromkeys(("median", "q1", "q3")))
                for d in ("iou", "dice")
            }
        )
        for c, s in p.scores.items()
    }
    return p.model_copy(update={"scores": scores, "suppressed": ["quantiles"]})


def test_default_policy_releases_payload_unchanged_but_quantiles_and_audits_it(site: Path) -> None:
    sent = payload()
    released = guard(site).release_payload(sent, records=RECORDS)
    assert released == _without_quantiles(sent) and released.suppressed == ["quantiles"]
    entries = list(read_audit(audit_path(site)))
    assert [e.event for e in entries] == ["received", "sent"]
    assert entries[0].app_hash == APP and entries[0].run_id == 3
    assert entries[1].payload == json.loads(released.model_dump_json())


def test_small_cells_are_suppressed_and_named_never_silently_zeroed(site: Path) -> None:
    released = guard(site, min_cell_count=3).release_payload(payload(), records=RECORDS)
    assert released.scores["muscle"].bins == {}  # 2 < 3 in one bin: the whole table goes
    assert released.scores["visceral_fat"].bins == {TOP: 12}  # untouched
    assert released.excluded == {}
    assert released.sarcopenia is None  # a cell of 1
    assert released.smi is not None and released.smi.n == 3  # 3 is not below 3
    assert released.findings == [] and released.discrepancy is not None
    assert released.discrepancy.findings == []
    assert set(released.suppressed) == {
        "quantiles",
        "scores.muscle.bins",
        "excluded",
        "sarcopenia",
        "findings.muscle:site_excludes:psoas",
        "discrepancy.findings.muscle:site_excludes:psoas",
    }
    released4 = guard(site, min_cell_count=4).release_payload(payload(), records=RECORDS)
    assert released4.smi is None and "smi" in released4.suppressed


def test_polar_maps_and_discrepancy_follow_the_policy(site: Path) -> None:
    no_polar = guard(site, allow_polar_maps=False).release_payload(payload(), records=RECORDS)
    assert no_polar.discrepancy is not None and no_polar.discrepancy.polar is None
    assert no_polar.suppressed == ["quantiles", "discrepancy.polar"]
    no_disc = guard(site, accept_tasks=("evaluate",)).release_payload(payload(), records=RECORDS)
    assert no_disc.discrepancy is None and no_disc.findings == []
    assert set(no_disc.suppressed) == {"quantiles", "discrepancy", "findings"}


def test_too_few_slices_is_refused_and_audited(site: Path) -> None:
    g = guard(site, min_slices=13)
    with pytest.raises(SiteRefusal, match="only 12 usable slice"):
        g.release_payload(payload(), records=RECORDS)
    assert [e for e, _ in events(site)] == ["received", "refused"]


def test_reply_naming_a_manifest_file_is_refused_without_repeating_it(site: Path) -> None:
    bad = payload().model_copy(update={"site": "CANARY-PATIENT-001.dcm"})
    with pytest.raises(SiteRefusal) as info:
        guard(site).release_payload(bad, records=RECORDS)
    assert "CANARY" not in info.value.reason
    assert "sent" not in [e for e, _ in events(site)]


def test_task_not_accepted_is_refused_after_auditing(site: Path) -> None:
    with pytest.raises(SiteRefusal, match="does not accept 'train'"):
        guard(site, "train", accept_tasks=("evaluate", "compare"))
    assert [e for e, _ in events(site)] == ["received", "refused"]
    # identify (pseudonym + row count) is always answered
    guard(site, "identify").release_identity("hospital-b", 12)


def test_app_not_on_allow_list_is_refused_naming_both_hashes(site: Path) -> None:
    ok = "b" * 64
    with pytest.raises(SiteRefusal) as info:
        guard(site, allowed_apps=(ok,))
    assert APP in info.value.reason and ok in info.value.reason
    assert open_guard(site, run_id=1, task="evaluate", config={}, app_hash=ok).app_hash == ok


@pytest.mark.parametrize("key", ["per-slice", "study.return-file-names", "patient-ids", "eval.per-slice-iou"])
def test_config_asking_outside_the_protocol_is_refused_by_name(site: Path, key: str) -> None:
    with pytest.raises(SiteRefusal, match=repr(key)):
        guard(site, config={keys.TASK: "evaluate", key: True})


def test_known_study_keys_are_accepted() -> None:
    assert (
        config_refusal({keys.TASK: "train", "train.lr": 2e-4, "study.sites": "a,b", "server-round": 1})
        is None
    )
    assert "list" in (config_refusal({"study.sites": ["a"]}) or "")


def test_invalid_policy_refuses_everything(site: Path) -> None:
    (site / "policy.toml").write_text("min-slices = -1\n", encoding="utf-8")
    with pytest.raises(SiteRefusal, match=r"policy\.toml"):
        guard(site)


def test_training_reply_metrics_allow_list_and_min_slices(site: Path) -> None:
    g = guard(site, "train")
    metrics = {keys.NUM_EXAMPLES: 9.0, "train-loss": 0.5}
    assert g.release_weights(9, "c" * 64, metrics) == metrics
    with pytest.raises(SiteRefusal, match="per-slice-loss"):
        g.release_weights(9, "c" * 64, {**metrics, "per-slice-loss": 1.0})
    with pytest.raises(SiteRefusal, match="finite"):
        g.release_weights(9, "c" * 64, {"train-loss": float("nan")})
    with pytest.raises(SiteRefusal, match="only 3 slice"):
        g.release_weights(3, "c" * 64, metrics)
    sent = [e for e in read_audit(audit_path(site)) if e.event == "sent"]
    assert sent[0].payload["weights_sha256"] == "c" * 64


def test_local_dp_is_required_when_the_policy_asks(site: Path) -> None:
    g = guard(site, "train", weights_dp=WeightsDp(enabled=True, clipping_norm=1.0, noise_multiplier=0.0))
    with pytest.raises(SiteRefusal, match="local DP"):
        g.release_weights(9, "c" * 64, {})
    update, applied = g.protect_update(np.array([3.0, 4.0], dtype=np.float32))
    assert applied and np.allclose(update, [0.6, 0.8])  # norm 5 clipped to 1, no noise
    noisy = clip_and_noise(np.zeros(10000), 1.0, 0.5, np.random.default_rng(0))
    assert abs(float(noisy.std()) - 0.5) < 0.02


def test_suppress_payload_is_pure_and_k1_withholds_only_quantiles() -> None:
    p = payload()
    data, marks = suppress_payload(p, SitePolicy())
    assert marks == ["quantiles"]
    assert EvaluationPayload.model_validate(data | {"suppressed": marks}) == _without_quantiles(p)
    assert p.scores["muscle"].iou.median is not None  # the input is untouched


def test_error_reasons_are_redacted_before_they_leave(site: Path) -> None:
    text = f"{site}/images/CANARY-PATIENT-001.dcm: unreadable; group canary-group-7"
    assert redact(text, site, never_leave(load_site(site))) == "<site>/<file>: unreadable; group <file>"
    g = guard(site)
    assert "CANARY" not in g.error_reason(text)
    assert "CANARY" not in audit_path(site).read_text(encoding="utf-8")


def _semicolon_site(tmp_path: Path) -> Path:
    """A site whose manifest.csv uses ';' and upper-case headers, as a spreadsheet in many
    European locales saves it; the dataset reads it like any other."""
    root = small_site(
        tmp_path / "hospital-semi",
        "IMAGE;Label;REFERENCE;Group\n"
        "ct/QZX-PATIENT-001.dcm;labels/QZX-MASK-001.png;refs/QZX-REF-001.png;QZX-GROUP-1\n"
        "ct/QZX-PATIENT-002.dcm;labels/QZX-MASK-002.png;;QZX-GROUP-2\n",
    )
    assert [row.image for row in load_site(root).rows] == ["ct/QZX-PATIENT-001.dcm", "ct/QZX-PATIENT-002.dcm"]
    return root


@pytest.mark.parametrize(
    "name", ["QZX-PATIENT-002.dcm", "qzx-mask-001.png", "refs/QZX-REF-001.png", "QZX-GROUP-1"]
)
def test_semicolon_manifest_file_names_and_groups_are_refused(tmp_path: Path, name: str) -> None:
    site = _semicolon_site(tmp_path)
    with pytest.raises(SiteRefusal) as info:
        guard(site).release_payload(payload().model_copy(update={"site": f"site {name}"}), records=RECORDS)
    assert "qzx" not in info.value.reason.lower()
    assert "sent" not in [e for e, _ in events(site)]


def test_semicolon_manifest_file_names_are_redacted_from_error_reasons(tmp_path: Path) -> None:
    site = _semicolon_site(tmp_path)
    reason = guard(site).error_reason(
        f"{site}/ct/QZX-PATIENT-001.dcm: unreadable; mask QZX-MASK-002.png; patient qzx-group-2"
    )
    assert reason == "<site>/<file>: unreadable; mask <file>; patient <file>"
    assert "QZX" not in audit_path(site).read_text(encoding="utf-8").upper()


def test_invalid_rows_are_screened_too(tmp_path: Path) -> None:
    """A row the dataset rejects (height 'abc') still names a file: its raw cells are screened."""
    site = small_site(
        tmp_path / "hospital-c",
        "image,label,height_m,group\n"
        "ct/fine-0001.dcm,labels/fine-0001.png,1.7,patient-ok\n"
        "ct/QZX-BAD-ROW.dcm,labels/QZX-BAD-MASK.png,abc,QZX-BAD-GROUP\n",
    )
    dataset = load_site(site)
    assert len(dataset.rows) == 1 and len(dataset.invalid_rows) == 1
    assert {"QZX-BAD-ROW.dcm", "ct/QZX-BAD-ROW.dcm", "QZX-BAD-MASK.png", "QZX-BAD-GROUP"} <= never_leave(
        dataset
    )
    with pytest.raises(SiteRefusal):
        guard(site).release_payload(
            payload().model_copy(update={"site": "QZX-BAD-MASK.png"}), records=RECORDS
        )


def test_never_leave_keeps_whole_group_keys_and_skips_short_strings(tmp_path: Path) -> None:
    site = small_site(
        tmp_path / "hospital-d", "image,label,group\nct\\scan-000042.dcm,l/m.png,pt/muscle-07\n"
    )
    strings = never_leave(load_site(site))
    # Windows separators in a path still yield the bare file name; short names ("m.png") are
    # too common to search for; a group key is kept whole (never its "file name" part).
    assert strings == {"ct\\scan-000042.dcm", "scan-000042.dcm", "l/m.png", "pt/muscle-07"}


def test_a_site_that_cannot_be_parsed_still_has_its_path_redacted(tmp_path: Path) -> None:
    site = tmp_path / "hospital-e"
    site.mkdir()  # no site.toml, no manifest.csv: no dataset, so no file name is known
    opened = open_guard(site, run_id=3, task="evaluate", config={keys.TASK: "evaluate"}, app_hash=APP)
    assert opened.error_reason(f"{site}/manifest.csv: missing") == "<site>/manifest.csv: missing"
    with pytest.raises(SiteRefusal, match="no parsed site"):
        opened.release_payload(payload(), records=RECORDS)  # unscreened replies never leave


def test_empty_allow_list_warns_once_per_site_per_run(site: Path, caplog: pytest.LogCaptureFixture) -> None:
    def warnings() -> int:
        return sum("allowed-apps is empty" in r.getMessage() for r in caplog.records)

    with caplog.at_level(logging.WARNING, logger="client.guard"):
        for task in ("identify", "train", "train", "evaluate"):  # each message: a fresh guard
            open_guard(site, run_id=3, task=task, config={keys.TASK: task}, app_hash=APP)
        assert warnings() == 1
        open_guard(site, run_id=4, task="identify", config={keys.TASK: "identify"}, app_hash=APP)
        assert warnings() == 2  # a new study warns again
        open_guard(site, run_id=34, task="identify", config={keys.TASK: "identify"}, app_hash=APP)
        assert warnings() == 3  # run 34 is not run 3
    write_policy(site, SitePolicy(allowed_apps=(APP,)))
    with caplog.at_level(logging.WARNING, logger="client.guard"):
        open_guard(site, run_id=5, task="identify", config={keys.TASK: "identify"}, app_hash=APP)
    assert warnings() == 3  # pinned: nothing to warn about


def test_raw_scores_key_stats_and_the_label_audit_follow_the_policy_too(site: Path) -> None:
    from protocols.findings import AuditCheck, KeyStats, LabelAudit

    check = {
        "class": "muscle", "direction": "site_excludes", "region": "psoas", "n_slices": 2, "n_present": 2,
        "prevalence": 1.0, "prevalence_low": 0.3, "prevalence_high": 1.0, "systematic": False,
        "conforms": False, "mean_area_cm2": 3.0, "mean_area_share": 0.1, "sentence": "psoas left out",
    }  # fmt: skip
    wide = {**check, "n_slices": 12, "n_present": 0, "prevalence": 0.0, "region": "paraspinal"}
    audit = LabelAudit(
        protocol="alberta", n_slices=12, checks=[AuditCheck.model_validate(c) for c in (check, wide)]
    )
    base = payload()
    small = KeyStats(
        n=2, n_present=2, sum_net_share=0.2, sum_sq_net_share=0.02, sum_net_cm2=6, sum_sq_net_cm2=18
    )
    stats = {"muscle:site_excludes:psoas": small}
    sent = base.model_copy(
        update={
            "raw_scores": base.scores,
            "label_audit": audit,
            "discrepancy": base.discrepancy.model_copy(update={"key_stats": stats}),  # type: ignore[union-attr]
        }
    )
    released = guard(site, min_cell_count=3).release_payload(sent, records=RECORDS)
    assert released.raw_scores is not None and released.raw_scores["muscle"].bins == {}
    assert released.label_audit is not None
    assert [c.region for c in released.label_audit.checks] == ["paraspinal"]
    assert released.discrepancy is not None and released.discrepancy.key_stats == {}
    assert {"raw_scores.muscle.bins", "label_audit.muscle:site_excludes:psoas"} <= set(released.suppressed)
    no_disc = guard(site, accept_tasks=("evaluate",)).release_payload(sent, records=RECORDS)
    assert no_disc.label_audit is None and "label_audit" in no_disc.suppressed


def test_convention_aware_shares_leave_only_over_min_slices_training_slices(site: Path) -> None:
    """An adjustment applied on fewer slices than min-slices (default 5) is one patient's anatomy:
    its share and slice count are withheld and the reply says so; the others leave as they are."""
    g = guard(site, "train")
    psoas_share, psoas_slices = keys.convention_keys("psoas")
    band_share, band_slices = keys.convention_keys("boundary")
    metrics = {
        keys.NUM_EXAMPLES: 9.0,
        keys.CONVENTION_AWARE: 1.0,
        psoas_share: 0.17,
        psoas_slices: 9.0,
        band_share: 0.01,
        band_slices: 2.0,
    }
    released = g.release_weights(9, "c" * 64, metrics)
    assert released[psoas_share] == 0.17 and released[psoas_slices] == 9.0
    assert band_share not in released and band_slices not in released
    assert released[keys.CONVENTION_WITHHELD] == 1.0
    sent = [e for e in read_audit(audit_path(site)) if e.event == "sent"]
    assert band_share not in sent[-1].payload["metrics"]
    # at min-slices exactly, it leaves
    assert g.release_weights(9, "c" * 64, {**metrics, band_slices: 5.0})[band_share] == 0.01
    # a declared adjustment withheld loses its declaration too (else it reads "declared, not confirmed")
    declared = {
        **metrics,
        keys.convention_declared_key("boundary"): 1.0,
        keys.convention_declared_key("psoas"): 1.0,
    }
    released = g.release_weights(9, "c" * 64, declared)
    assert keys.convention_declared_key("boundary") not in released
    assert released[keys.convention_declared_key("psoas")] == 1.0
