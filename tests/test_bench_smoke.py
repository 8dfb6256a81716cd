"""The benches' pure helpers (no timing, no Flower run): parsing run folders and audit logs."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bench_federated import (
    TimedLines,
    audit_spans,
    federation_config,
    parse_rounds,
    pooled_iou,
    run_config,
    superlink_pids,
)
from bench_validation_round import report_write_seconds, round_between

from protocols.study import StudyConfig


def _round(n: int, seconds: float, sites: dict[str, float], iou: float | None, status: str = "ok") -> str:
    return json.dumps(
        {
            "round": n,
            "status": status,
            "seconds": seconds,
            "per_site": {s: {"seconds": t, "num-examples": 9.0} for s, t in sites.items()},
            "pooled_val_iou": {"muscle": iou, "msv": 0.5},
        }
    )


def test_parse_rounds_keeps_ok_rounds_and_computes_both_overhead_ratios() -> None:
    lines = [
        _round(1, 12.0, {"a": 3.0, "b": 4.0, "c": 5.0}, 0.2),
        "",
        _round(2, 6.0, {"a": 1.0}, None, status="failed"),
        _round(3, 13.0, {"a": 4.0, "b": 4.0, "c": 5.0}, 0.7),
    ]
    rounds = parse_rounds(lines)
    assert [r.round for r in rounds] == [1, 3]
    assert rounds[0].vs_slowest == pytest.approx(12.0 / 5.0)
    assert rounds[0].vs_sum == pytest.approx(1.0)
    assert rounds[1].muscle_iou == 0.7


def test_pooled_iou_pools_pixels_not_site_means() -> None:
    # site 1: 90/100, site 2: 1/10 -> pooled 91/110, not the mean of 0.9 and 0.1
    assert pooled_iou([(90, 100), (1, 10)]) == pytest.approx(91 / 110)
    assert pooled_iou([(0, 0)]) is None


def _audit(event: str, task: str, when: str, run_id: int = 7) -> str:
    return json.dumps({"event": event, "task": task, "time": when, "run_id": run_id})


def test_audit_spans_pair_received_with_sent_of_the_same_run_and_task() -> None:
    lines = [
        _audit("received", "identify", "2026-01-01T10:00:00.000+00:00"),
        _audit("received", "train", "2026-01-01T10:00:01.000+00:00"),
        _audit("sent", "train", "2026-01-01T10:00:03.500+00:00"),
        _audit("received", "train", "2026-01-01T10:00:05.000+00:00", run_id=8),  # other run
        _audit("received", "train", "2026-01-01T10:00:06.000+00:00"),
        _audit("refused", "train", "2026-01-01T10:00:06.100+00:00"),  # nothing sent
        _audit("received", "train", "2026-01-01T10:00:10.000+00:00"),
        _audit("sent", "train", "2026-01-01T10:00:10.250+00:00"),
    ]
    spans = audit_spans(lines, 7, "train")
    assert [s.seconds for s in spans] == pytest.approx([2.5, 0.25])
    assert audit_spans(lines, 7, "evaluate") == []


def test_round_between_uses_the_arrival_times_of_the_two_server_lines() -> None:
    echo = TimedLines(
        lines=[(10.0, "INFO : sites: a (node 1)"), (11.0, "x"), (14.5, "INFO : study report: /r")]
    )
    assert round_between(echo) == pytest.approx(4.5)
    assert round_between(TimedLines(lines=[(1.0, "INFO : sites: a")])) is None


def test_report_write_seconds_reads_the_coordinators_file_times(tmp_path: Path) -> None:
    (tmp_path / "report.json").write_text("{}")
    (tmp_path / "LATEST").write_text("x")
    now = time.time()
    os.utime(tmp_path / "report.json", (now, now))
    os.utime(tmp_path / "LATEST", (now + 1.5, now + 1.5))
    assert report_write_seconds(tmp_path, tmp_path / "LATEST") == pytest.approx(1.5)


def test_run_config_is_a_valid_study_that_never_stops_early(tmp_path: Path) -> None:
    args = argparse.Namespace(
        rounds=5, sites=3, encoder="resnet18", size=64, local_epochs=2, val_fraction=0.25, seed=3, slices=8
    )
    flat = run_config(args, tmp_path / "sites", tmp_path / "studies")
    study = StudyConfig.from_run_config(flat)  # type: ignore[arg-type]
    assert study.study.mode == "train" and study.study.num_rounds == 5
    assert study.train.local_epochs == 2 and study.train.seed == 3 and study.train.val_fraction == 0.25
    assert study.train.test_fraction == 0.0  # the setting bench/README.md's numbers were measured in
    assert study.train.patience >= study.study.num_rounds
    assert "train.lr" in flat  # every training key explicit: both arms read the same recipe


def test_federation_config_and_superlink_lookup_touch_only_what_they_are_given(tmp_path: Path) -> None:
    assert federation_config(3, None) == {"num-supernodes": 3}
    assert federation_config(3, 1) == {"num-supernodes": 3, "client-resources-num-cpus": 1}
    assert superlink_pids(tmp_path / "no-such-flwr-home") == []


def test_centralised_trains_on_the_sites_train_splits_and_scores_their_val_splits(tmp_path: Path) -> None:
    from bench_federated import centralised

    from common.dataset import load_site
    from common.demo.hospitals import make_demo
    from common.splits import split_site

    sites = make_demo(tmp_path / "sites", sites=2, slices=4, size=64)
    args = argparse.Namespace(
        rounds=1, sites=2, encoder="resnet18", size=64, local_epochs=1, val_fraction=0.25, seed=0, slices=4
    )
    study = StudyConfig.from_run_config(run_config(args, tmp_path / "sites", tmp_path / "studies"))  # type: ignore[arg-type]
    splits = [split_site(load_site(d), study.train) for d in sites]
    result = centralised(sites, study)
    assert result.n_train == sum(len(s.train) for s in splits)
    assert result.n_val == sum(len(s.val) for s in splits) > 0
    assert result.muscle_iou is not None and 0.0 <= result.muscle_iou <= 1.0


def test_bench_conventions_fedavg_weights_by_training_slices_and_rounds_integer_buffers() -> None:
    import torch
    from bench_conventions import fedavg

    a = {"w": torch.tensor([0.0, 4.0]), "n": torch.tensor(1)}
    b = {"w": torch.tensor([4.0, 0.0]), "n": torch.tensor(4)}
    out = fedavg([a, b], [1, 3])
    assert torch.allclose(out["w"], torch.tensor([3.0, 1.0]))
    assert out["n"].dtype == torch.int64 and int(out["n"]) == 3  # 0.25 * 1 + 0.75 * 4 = 3.25 -> 3


def test_bench_conventions_with_every_hospital_on_its_truth_is_the_reference_labels_arm(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``--truth-at`` puts a convention hospital on the reference labels of its images in the
    convention-aware arm; with all three there, that arm is arm (e), weight for weight."""
    from bench_conventions import OTHER_KEYS, main

    truth = [arg for key in OTHER_KEYS for arg in ("--truth-at", key)]
    small = ["--size", "96", "--model-size", "64", "--slices", "6", "--held-out-slices", "3"]
    assert main([*small, "--rounds", "1", "--local-epochs", "1", "--arms", "de", *truth, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert all(out["adjustments"][key] == [[], {"reference labels": 1.0}] for key in OTHER_KEYS)
    scores = {arm: {k: v for k, v in s.items() if k != "seconds"} for arm, s in out["arms"].items()}
    assert scores["convention-aware, weighted"] == scores["all, reference labels"]


def test_bench_gpu_runs_an_epoch_and_inference_on_any_device(capsys: pytest.CaptureFixture[str]) -> None:
    """bench_gpu.py is for a machine with a CUDA GPU (issue 16); its smoke form runs anywhere, so
    the one device call a session may get does not fail on a typo."""
    import numpy as np
    from bench_gpu import main, synthetic_slices

    slices = synthetic_slices(3, 48)
    assert all(set(np.unique(s.label)) == {0, 1, 2, 3} for s in slices)
    assert slices[0].hu.shape == (48, 48) and not np.array_equal(slices[0].label, slices[1].label)
    assert main(["--device", "cpu", "--slices", "4", "--size", "64", "--encoder", "resnet18", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    phases = {p["what"]: p for p in out["phases"]}
    assert set(phases) == {"training, 1 epoch", "inference"}
    assert all(p["slices"] == 4 and p["slices_per_s"] > 0 for p in phases.values())
    assert phases["inference"]["compute"].startswith("cpu fp32")  # inference stays fp32 on auto
