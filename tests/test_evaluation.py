"""common.evaluation: per-slice scoring, aggregation, pooling, harmonising, site runs."""

from __future__ import annotations

import csv
import sys
import types
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from common.dataset import load_site
from common.evaluation import SliceRecord, aggregate, count_groups, harmonise, patients_of, score_slice
from common.pooling import pool_area_agreement, pool_class_scores, pool_smi_agreement
from protocols.payloads import EvaluationPayload
from protocols.protocol import HuRanges

M, S, V = 1, 2, 3
SPACING = (1.0, 1.0)  # 0.01 cm^2 per pixel


def _record(test: np.ndarray, label: np.ndarray, **kw: object) -> SliceRecord:
    hu = kw.pop("hu", np.zeros(label.shape, dtype=np.float32))
    defaults: dict[str, object] = {"group": "p", "height_m": None, "sex": None}
    defaults.update(kw)
    return score_slice(test, label, hu, SPACING, **defaults)  # type: ignore[arg-type]


def _square(size: int, value: int, n_px: int) -> np.ndarray:
    """A size x size mask whose first ``n_px`` pixels (row-major) are ``value``."""
    mask = np.zeros(size * size, dtype=np.uint8)
    mask[:n_px] = value
    return mask.reshape(size, size)


def test_score_slice_areas_hu_and_smi() -> None:
    label = np.array([[M, M], [S, 0]], dtype=np.uint8)
    test = np.array([[M, 0], [S, S]], dtype=np.uint8)
    hu = np.array([[40.0, 60.0], [-100.0, -80.0]], dtype=np.float32)
    r = score_slice(test, label, hu, (10.0, 20.0), group="p1", height_m=2.0, sex="M")  # 2 cm^2 / px
    assert r.label_cm2 == {"muscle": 4.0, "subcutaneous_fat": 2.0, "visceral_fat": 0.0}
    assert r.test_cm2 == {"muscle": 2.0, "subcutaneous_fat": 4.0, "visceral_fat": 0.0}
    assert r.label_hu == {"muscle": 50.0, "subcutaneous_fat": -100.0, "visceral_fat": None}
    assert r.test_hu == {"muscle": 40.0, "subcutaneous_fat": -90.0, "visceral_fat": None}
    assert (r.smi_label, r.smi_test) == (1.0, 0.5)
    assert r.iou["muscle"] == 0.5 and r.iou["visceral_fat"] is None and r.dice["visceral_fat"] is None
    assert r.harmonised is None
    assert score_slice(test, label, hu, SPACING, group="p", height_m=None, sex="F").smi_label is None


def test_harmonise_keeps_tissue_pixels_only_inside_their_hu_range() -> None:
    mask = np.array([[M, M, S, S], [V, V, 0, M]], dtype=np.uint8)
    hu = np.array([[-29.0, -30.0, -190.0, -29.0], [-50.0, -49.0, 100.0, 150.0]], dtype=np.float32)
    out = harmonise(mask, hu, HuRanges())
    assert out.tolist() == [[M, 0, S, 0], [V, 0, 0, M]]  # edges inclusive
    assert mask.tolist()[0][1] == M  # input untouched
    wide_vat = HuRanges(visceral_fat=(-190.0, -30.0))
    assert harmonise(mask, hu, wide_vat)[1, 1] == V


def test_harmonised_rescoring_ignores_fat_density_pixels_left_in_muscle() -> None:
    # The label keeps an intramuscular fat pixel (-80 HU) inside muscle; the test leaves it out.
    label = np.array([[M, M], [M, 0]], dtype=np.uint8)
    test = np.array([[M, M], [0, 0]], dtype=np.uint8)
    hu = np.array([[40.0, 40.0], [-80.0, 0.0]], dtype=np.float32)
    r = score_slice(test, label, hu, SPACING, group="p", height_m=None, sex=None, hu_ranges=HuRanges())
    assert r.iou["muscle"] == pytest.approx(2 / 3)
    assert r.harmonised is not None and r.harmonised["muscle"].iou == 1.0


def _handful() -> list[SliceRecord]:
    """Five 10x10 slices with muscle IoU 1.0, 0.9, 0.85, 0.7, 0.5 and VAT absent on two."""
    size = 10
    cases = [(50, 50), (45, 50), (34, 40), (35, 50), (25, 50)]  # (test px inside label, label px)
    records = []
    for i, (inter, n_label) in enumerate(cases):
        label = _square(size, M, n_label)
        test = _square(size, M, inter)
        if i < 3:
            label[9, :] = V
            test[9, :5] = V
        records.append(
            _record(
                test, label, group=f"p{i // 2}", height_m=1.0 + i * 0.1 if i != 4 else None, sex="MF"[i % 2]
            )
        )
    return records


def _payload(records: list[SliceRecord], **kw: object) -> EvaluationPayload:
    args: dict[str, object] = {
        "task": "evaluate",
        "site": "h",
        "fingerprint": "fp",
        "model_hash": "mh",
        "n_listed": len(records) + 2,
        "excluded": Counter({"missing_file": 2}),
    }
    args.update(kw)
    return aggregate(records, **args)  # type: ignore[arg-type]


def test_aggregate_matches_an_independent_recomputation() -> None:
    records = _handful()
    payload = _payload(records)
    muscle = payload.scores["muscle"]
    assert muscle.bins == {"[0.9,1.0]": 2, "[0.8,0.9)": 1, "[0.7,0.8)": 1, "[0,0.7)": 1}
    assert muscle.undefined == 0
    ious = [1.0, 0.9, 0.85, 0.7, 0.5]
    assert muscle.iou.n == 5
    assert muscle.iou.mean == pytest.approx(np.mean(ious))
    assert muscle.iou.sd == pytest.approx(np.std(ious, ddof=1))
    assert (muscle.iou.q1, muscle.iou.median, muscle.iou.q3) == pytest.approx((0.7, 0.85, 0.9))
    assert muscle.intersection_px == 50 + 45 + 34 + 35 + 25
    assert muscle.union_px == 50 + 50 + 40 + 50 + 50  # test inside label: U = label px
    vat = payload.scores["visceral_fat"]
    assert vat.undefined == 2 and vat.iou.n == 3 and sum(vat.bins.values()) == 3
    assert vat.iou.mean == pytest.approx(0.5)
    msv = payload.scores["msv"]
    assert msv.intersection_px == muscle.intersection_px + vat.intersection_px
    assert msv.union_px == muscle.union_px + vat.union_px + payload.scores["subcutaneous_fat"].union_px
    # Bland-Altman on muscle area (test - label, cm^2)
    diffs = [r.test_cm2["muscle"] - r.label_cm2["muscle"] for r in records]
    area = payload.areas["muscle"]
    assert area.n == 5
    assert area.mean_diff_cm2 == pytest.approx(np.mean(diffs))
    assert area.sd_diff_cm2 == pytest.approx(np.std(diffs, ddof=1))
    assert area.sum_sq_diff_cm2 == pytest.approx(np.sum(np.square(diffs)))
    assert payload.smi is not None and payload.smi.n == 4  # the last slice has no height
    assert payload.n_used == 5 and payload.n_listed == 7 and payload.n_groups == 3
    assert patients_of(records) == {"p0", "p1", "p2"} and count_groups(records) == 3
    assert payload.excluded == {"missing_file": 2}
    assert payload.harmonised_scores is None
    EvaluationPayload.model_validate_json(payload.model_dump_json())  # serialisable, no NaN


def test_sarcopenia_confusion_with_label_as_truth() -> None:
    size = 10

    # 10 mm x 10 mm = 1 cm^2 per pixel and height 1 m: SMI = muscle pixels.
    def rec(label_px: int, test_px: int, sex: str | None, height: float | None) -> SliceRecord:
        label, test = _square(size, M, label_px), _square(size, M, test_px)
        return score_slice(test, label, np.zeros((size, size), np.float32), (10.0, 10.0),
                           group="p", height_m=height, sex=sex)  # fmt: skip

    records = [
        rec(50, 45, "M", 1.0),  # both sarcopenic (< 52.4)
        rec(50, 60, "M", 1.0),  # label only
        rec(40, 30, "F", 1.0),  # test only (< 38.5)
        rec(60, 55, "M", 1.0),  # neither
        rec(60, 55, None, 1.0),  # unknown sex
        rec(60, 55, "M", None),  # unknown height
    ]
    conf = _payload(records, cutoff_set="prado2008").sarcopenia
    assert conf is not None
    assert (conf.both_sarcopenic, conf.label_only, conf.test_only, conf.neither, conf.unknown) == (
        1,
        1,
        1,
        1,
        2,
    )
    assert conf.cutoff_set == "prado2008"
    korean = _payload(records, cutoff_set="korean").sarcopenia
    assert korean is not None and korean.neither == 4
    with pytest.raises(ValueError, match="valid sets"):
        _payload(records, cutoff_set="nope")


def test_aggregate_of_no_record_is_a_valid_empty_payload() -> None:
    payload = _payload([], excluded=Counter({"unreadable_image": 3, "no_reference": 0}))
    assert payload.n_used == 0 and payload.scores["msv"].iou.n == 0
    assert payload.excluded == {"unreadable_image": 3}
    assert payload.areas["muscle"].mean_diff_cm2 is None


def test_harmonised_scores_need_harmonised_records() -> None:
    records = _handful()
    with pytest.raises(ValueError, match="hu_ranges"):
        _payload(records, harmonised=True)
    label = _square(4, M, 8)
    hu = np.full((4, 4), 40.0, dtype=np.float32)
    rec = score_slice(label, label, hu, SPACING, group="p", height_m=None, sex=None, hu_ranges=HuRanges())
    payload = _payload([rec], harmonised=True)
    assert payload.harmonised_scores is not None
    assert payload.harmonised_scores["muscle"].bins["[0.9,1.0]"] == 1


def test_pooling_two_sites_equals_the_concatenated_records() -> None:
    records = _handful()
    extra = [_record(_square(10, M, 20), _square(10, M, 30)), _record(_square(10, S, 30), _square(10, M, 30))]
    part_a, part_b = records[:3], records[3:] + extra
    a, b, whole = _payload(part_a), _payload(part_b), _payload(part_a + part_b)
    for tissue in ("muscle", "subcutaneous_fat"):
        pooled = pool_area_agreement([a.areas[tissue], b.areas[tissue]])
        expected = whole.areas[tissue]
        assert pooled.n == expected.n
        for field in ("mean_label_cm2", "mean_test_cm2", "mean_diff_cm2", "sd_diff_cm2", "sum_diff_cm2"):
            assert getattr(pooled, field) == pytest.approx(getattr(expected, field)), field
    for name in ("muscle", "msv", "visceral_fat"):
        pooled_scores = pool_class_scores([a.scores[name], b.scores[name]])
        expected_scores = whole.scores[name]
        assert pooled_scores.bins == expected_scores.bins
        assert pooled_scores.undefined == expected_scores.undefined
        assert pooled_scores.union_px == expected_scores.union_px
        assert pooled_scores.iou.n == expected_scores.iou.n
        assert pooled_scores.iou.mean == pytest.approx(expected_scores.iou.mean)
        assert pooled_scores.iou.sd == pytest.approx(expected_scores.iou.sd)
        assert pooled_scores.dice.sd == pytest.approx(expected_scores.dice.sd)
    assert pool_class_scores([a.scores["muscle"], b.scores["muscle"]]).iou.median is None
    assert a.smi is not None and b.smi is not None and whole.smi is not None
    pooled_smi = pool_smi_agreement([a.smi, b.smi])
    assert pooled_smi.n == whole.smi.n
    assert pooled_smi.sd_diff == pytest.approx(whole.smi.sd_diff)


# --------------------------------------------------------------------------- site runs


def _read_manifest(root: Path) -> list[dict[str, str]]:
    with (root / "manifest.csv").open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_compare_site_scores_reference_against_label_and_counts_exclusions(tmp_path: Path) -> None:
    from common.evaluation import compare_site
    from tests.fixtures_site import make_site, write_manifest

    root = make_site(tmp_path, n=4, size=64, with_reference=True, groups=2)
    rows = _read_manifest(root)
    rows[3]["reference"] = ""  # no reference on this row
    rows.append({**rows[0], "image": "ct/absent.dcm"})  # missing file
    write_manifest(root, rows)
    seen: list[tuple[int, int]] = []

    def hook(item: object, test_mask: np.ndarray) -> None:
        seen.append((item.index, int(test_mask.sum())))  # type: ignore[attr-defined]

    payload, records = compare_site(load_site(root), cutoff_set="korean", on_slice=hook)
    assert payload.task == "compare" and payload.model_hash is None
    assert payload.n_listed == 5 and payload.n_used == 3 and len(records) == 3
    assert payload.excluded == {"no_reference": 1, "missing_file": 1}
    assert payload.n_groups == 2
    assert [index for index, _ in seen] == [0, 1, 2]
    # The reference calls the IMAT blob muscle, the label does not: only muscle disagrees.
    assert payload.scores["subcutaneous_fat"].bins["[0.9,1.0]"] == 3
    assert payload.scores["visceral_fat"].iou.mean == 1.0
    muscle = payload.scores["muscle"]
    assert muscle.intersection_px < muscle.union_px
    assert payload.areas["muscle"].mean_diff_cm2 is not None and payload.areas["muscle"].mean_diff_cm2 > 0
    # Harmonising with the muscle HU range removes the fat-density blob from the reference.
    assert payload.harmonised_scores is not None
    assert payload.harmonised_scores["muscle"].iou.mean == pytest.approx(1.0)
    assert payload.smi is not None and payload.smi.n == 3
    assert payload.sarcopenia is not None and payload.sarcopenia.cutoff_set == "korean"
    assert payload.dataset_fingerprint
    EvaluationPayload.model_validate_json(payload.model_dump_json())


def _fake_model_modules(monkeypatch: pytest.MonkeyPatch, predict: object) -> None:
    """Stand-ins for common.model / common.inference so batching is tested without torch."""
    model_mod = types.ModuleType("common.model")
    model_mod.load_model = lambda path: types.SimpleNamespace(  # type: ignore[attr-defined]
        model=None, spec=None, meta={}, weights_hash="hash-of-" + Path(path).name
    )
    inference_mod = types.ModuleType("common.inference")
    inference_mod.predict_masks = predict  # type: ignore[attr-defined]

    class Segmenter:  # common.inference.Segmenter's surface: built once, called per batch
        compute = None

        @classmethod
        def build(cls, model: object, spec: object, compute: object, *, slices: int) -> Segmenter:
            return cls()

        def __call__(self, images: list[np.ndarray], *, batch_size: int = 4) -> list:
            return predict(None, None, images, batch_size=batch_size)  # type: ignore[operator]

    inference_mod.Segmenter = Segmenter  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "common.model", model_mod)
    monkeypatch.setitem(sys.modules, "common.inference", inference_mod)


def test_evaluate_site_streams_batches_and_isolates_failing_slices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from common.evaluation import evaluate_site
    from tests.fixtures_site import make_site

    root = make_site(tmp_path, n=5, size=32)
    calls: list[int] = []

    def predict(
        model: object, spec: object, images: list[np.ndarray], *, batch_size: int = 4, compute: object = None
    ) -> list:
        calls.append(len(images))
        assert len(images) <= batch_size
        if len(calls) in (1, 3):  # the first batch fails, then its second slice alone fails again
            raise RuntimeError("simulated inference failure")
        masks = [np.where(hu > 0, M, 0).astype(np.uint8) for hu in images]
        if len(calls) == 4:
            masks[1] = masks[1][:8]  # wrong shape: scoring of that slice fails
        return masks

    _fake_model_modules(monkeypatch, predict)
    scored: list[int] = []
    payload, records = evaluate_site(
        load_site(root),
        tmp_path / "model.pt",
        batch_size=2,
        on_slice=lambda item, mask: scored.append(item.index),
    )
    assert calls == [2, 1, 1, 2, 1]
    assert scored == [0, 2, 4]
    assert payload.n_used == 3 and len(records) == 3
    assert payload.excluded == {"evaluation_error": 2}
    assert payload.model_hash == "hash-of-model.pt" and payload.task == "evaluate"
    assert payload.harmonised_scores is not None
    assert payload.scores["subcutaneous_fat"].bins["[0,0.7)"] == 3  # the fake never predicts fat


def test_a_slice_failing_to_score_never_stops_compare(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import common.evaluation as evaluation
    from tests.fixtures_site import make_site

    root = make_site(tmp_path, n=3, size=32, with_reference=True)
    real = evaluation.score_slice
    count = {"n": 0}

    def flaky(*args: object, **kwargs: object) -> SliceRecord:
        count["n"] += 1
        if count["n"] == 2:
            raise FloatingPointError("boom")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(evaluation, "score_slice", flaky)
    payload, _ = evaluation.compare_site(load_site(root), harmonised=False)
    assert payload.n_used == 2 and payload.excluded == {"evaluation_error": 1}
    assert payload.harmonised_scores is None


@pytest.mark.slow
def test_evaluate_site_with_an_untrained_tiny_model(tmp_path: Path) -> None:
    from common.evaluation import evaluate_site
    from common.model import ModelSpec, build_model, load_model, save_model
    from tests.fixtures_site import make_site

    root = make_site(tmp_path, n=3, size=64, groups=2)
    spec = ModelSpec(encoder="resnet18", image_size=64)
    model_path = save_model(tmp_path / "model.pt", build_model(spec), spec)
    payload, records = evaluate_site(load_site(root), model_path, batch_size=2)
    assert payload.task == "evaluate" and payload.n_used == 3 and payload.n_groups == 2
    assert payload.model_hash == load_model(model_path).weights_hash
    assert sum(payload.scores["msv"].bins.values()) + payload.scores["msv"].undefined == 3
    assert payload.harmonised_scores is not None and payload.smi is not None and payload.smi.n == 3
    assert len(records) == 3 and all(r.smi_label is not None for r in records)
    again, _ = evaluate_site(load_site(root), load_model(model_path), batch_size=3, harmonised=False)
    assert again.scores == payload.scores  # same model, other batching: same numbers
    assert again.harmonised_scores is None
    EvaluationPayload.model_validate_json(payload.model_dump_json())
