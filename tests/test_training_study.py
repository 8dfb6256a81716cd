"""Training-study glue: Flower's FedAvg weighted by training slices, pooled validation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from client.site_tasks import run_train
from common.dataset import load_site
from common.demo.hospitals import make_site, site_profile
from common.model import ModelSpec, build_model
from protocols import keys
from protocols.study import StudyConfig
from server.messaging import Replies
from server.training import make_strategy, pooled_validation

pytestmark = pytest.mark.usefixtures("flower_task_identity")


def _reply(weights: np.ndarray, metrics: dict[str, float]) -> Message:
    content = RecordDict(
        {
            keys.ARRAYS: ArrayRecord({keys.PACKED: Array(weights.astype(np.float32))}),
            keys.METRICS: MetricRecord(metrics),
        }
    )
    return Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)


@pytest.mark.parametrize("name", ["fedavg", "fedprox"])
def test_flower_strategy_weights_sites_by_their_training_slices(name: str) -> None:
    study = StudyConfig.from_run_config({"strategy.name": name})
    strategy = make_strategy(study, n_sites=2)
    replies = [
        _reply(np.zeros(3), {keys.NUM_EXAMPLES: 1.0}),
        _reply(np.full(3, 4.0), {keys.NUM_EXAMPLES: 3.0}),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    np.testing.assert_allclose(arrays[keys.PACKED].numpy(), [3.0, 3.0, 3.0])  # (0*1 + 4*3) / 4


def test_site_reports_training_slices_not_batches(tmp_path: Path) -> None:
    site = make_site(tmp_path / "site", site_profile(0), slices=7, size=64, seed=1)
    study = StudyConfig.from_run_config(
        {
            "train.val-fraction": 0.0,
            "train.test-fraction": 0.0,
            "train.batch-size": 4,
            "model.image-size": 64,
            "model.encoder": "resnet18",
        }
    )
    spec = ModelSpec(encoder="resnet18", image_size=64)
    _, metrics = run_train(load_site(site), build_model(spec), spec, study)
    assert metrics[keys.NUM_EXAMPLES] == 7.0  # 7 slices, which are 2 batches of 4
    assert set(metrics) <= set(keys.TRAIN_METRIC_KEYS)


def test_pooled_validation_is_summed_over_slices_and_pixels() -> None:
    replies = Replies(
        ok={
            1: _reply(
                np.zeros(1),
                {
                    "n-val": 1.0,
                    "val-loss-sum": 0.5,
                    "val-muscle-intersection": 10.0,
                    "val-muscle-union": 20.0,
                },
            ),
            2: _reply(
                np.zeros(1),
                {
                    "n-val": 3.0,
                    "val-loss-sum": 0.3,
                    "val-muscle-intersection": 30.0,
                    "val-muscle-union": 40.0,
                },
            ),
            3: _reply(np.zeros(1), {"n-val": 0.0}),  # a site without a validation split
        }
    )
    loss, iou = pooled_validation(replies)
    assert loss == pytest.approx(0.8 / 4)  # not the mean of per-site means (0.3)
    assert iou["muscle"] == pytest.approx(40 / 60)  # pooled over pixels, not mean of 0.5 and 0.75


class FakeSites:
    """A Grid whose sites answer each train message at once: the weights + 1, fixed metrics.

    Sites listed in ``failing`` reply with an error instead (as a site crash would).
    """

    def __init__(
        self,
        metrics: dict[int, dict[str, float]],
        failing: tuple[int, ...] = (),
        compute: dict[int, tuple[str, str]] | None = None,
    ) -> None:
        self.metrics, self.failing = metrics, failing
        self.compute = compute or {}
        self.replies: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return sorted(self.metrics)

    def push_messages(self, messages: list[Message]) -> list[str]:
        from flwr.app import Error

        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id  # what a real Grid does on push
            node = msg.metadata.dst_node_id
            if node in self.failing:
                reply = Message(Error(code=keys.ERROR_FAILED, reason="site crashed"), reply_to=msg)
            else:
                packed = msg.content.array_records[keys.ARRAYS][keys.PACKED].numpy()
                content = RecordDict(
                    {
                        keys.ARRAYS: ArrayRecord({keys.PACKED: Array(packed + 1.0)}),
                        keys.METRICS: MetricRecord(self.metrics[node]),
                    }
                )
                if node in self.compute:
                    device, precision = self.compute[node]
                    content[keys.COMPUTE] = ConfigRecord(
                        {keys.COMPUTE_DEVICE: device, keys.COMPUTE_PRECISION: precision}
                    )
                reply = Message(content, reply_to=msg)
            self.replies[msg.metadata.message_id] = reply
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, ids: set[str]) -> list[Message]:
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]


SITE_METRICS = {
    1: {keys.NUM_EXAMPLES: 6.0, keys.N_VAL: 2.0, keys.VAL_LOSS_SUM: 1.0, keys.SECONDS: 3.0},
    2: {keys.NUM_EXAMPLES: 2.0, keys.N_VAL: 3.0, keys.VAL_LOSS_SUM: 0.5, keys.SECONDS: 4.0},
}
SMALL_STUDY = {"model.encoder": "resnet18", "model.image-size": 64, "study.min-sites": 2}


def test_each_training_round_is_a_round_record_in_rounds_jsonl_and_the_checkpoint(tmp_path: Path) -> None:
    from protocols.report import RoundRecord
    from server.checkpoint import load_checkpoint
    from server.training import run_training

    study = StudyConfig.from_run_config(SMALL_STUDY | {"study.num-rounds": 2})
    seen: list[RoundRecord] = []
    outcome = run_training(FakeSites(SITE_METRICS), study, tmp_path, {1: "a", 2: "b"}, on_round=seen.append)  # type: ignore[arg-type]
    history = outcome.history
    assert [r.round for r in history] == [1, 2] and seen == history
    lines = (tmp_path / "rounds.jsonl").read_text(encoding="utf-8").splitlines()
    assert [RoundRecord.model_validate_json(line) for line in lines] == history
    assert load_checkpoint(tmp_path).history == history
    first, second = history
    assert (first.status, first.sites_sent, first.sites_replied, first.sites_failed) == (
        "ok",
        ["a", "b"],
        ["a", "b"],
        {},
    )
    assert first.pooled_val_loss == pytest.approx(1.5 / 5)  # summed over validation slices
    assert first.per_site["b"][keys.SECONDS] == 4.0
    assert second.start_weights_hash == first.weights_hash != second.weights_hash
    assert (tmp_path / "model.pt").exists()


def test_a_round_with_too_few_replies_is_recorded_as_failed_before_the_study_stops(tmp_path: Path) -> None:
    from common.errors import SarcofedError
    from protocols.report import RoundRecord
    from server.training import run_training

    study = StudyConfig.from_run_config(SMALL_STUDY | {"study.num-rounds": 3})
    with pytest.raises(SarcofedError, match=r"round 1: only 1 site\(s\) replied"):
        run_training(FakeSites(SITE_METRICS, failing=(2,)), study, tmp_path, {1: "a", 2: "b"})  # type: ignore[arg-type]
    (line,) = (tmp_path / "rounds.jsonl").read_text(encoding="utf-8").splitlines()
    record = RoundRecord.model_validate_json(line)
    assert (record.round, record.status, record.sites_replied) == (1, "failed", ["a"])
    assert record.sites_failed == {"b": "site crashed"} and record.weights_hash is None


def test_sites_whose_training_replies_carry_different_metrics_still_train_the_model(tmp_path: Path) -> None:
    """A site that withheld its validation metrics (or reports a DP-SGD epsilon) sends other metric
    keys than the rest; Flower's strategy only weights and averages the weights, so the round goes
    on, and the pooled validation loss is over the sites that released one."""
    from server.training import run_training

    differing = {
        1: SITE_METRICS[1],
        2: {keys.NUM_EXAMPLES: 2.0, keys.VAL_WITHHELD: 1.0, keys.SECONDS: 4.0, keys.DP_EPSILON: 2.5},
    }
    study = StudyConfig.from_run_config(SMALL_STUDY | {"study.num-rounds": 1})
    (record,) = run_training(FakeSites(differing), study, tmp_path, {1: "a", 2: "b"}).history  # type: ignore[arg-type]
    assert record.status == "ok" and record.weights_hash is not None
    assert record.pooled_val_loss == pytest.approx(1.0 / 2)  # site a only
    assert record.per_site["b"][keys.VAL_WITHHELD] == 1.0  # what b sent is recorded as sent


#: Every site withheld its validation metrics (too few validation patients for its policy).
WITHHOLDING = {
    1: {keys.NUM_EXAMPLES: 6.0, keys.VAL_WITHHELD: 1.0, keys.SECONDS: 3.0},
    2: {keys.NUM_EXAMPLES: 2.0, keys.VAL_WITHHELD: 1.0, keys.SECONDS: 4.0},
}


def test_without_any_pooled_validation_loss_the_model_is_the_last_round_and_training_runs_on(
    tmp_path: Path,
) -> None:
    """No loss to stop on: neither early stopping after ``patience`` rounds nor a round-1 model."""
    from common.model import load_model
    from server.training import contributing_sites, run_training, training_notes

    study = StudyConfig.from_run_config(SMALL_STUDY | {"study.num-rounds": 4, "train.patience": 2})
    outcome = run_training(FakeSites(WITHHOLDING), study, tmp_path, {1: "a", 2: "b"})  # type: ignore[arg-type]
    assert [r.round for r in outcome.history] == [1, 2, 3, 4] and not outcome.stopped_early
    assert all(r.pooled_val_loss is None for r in outcome.history)
    saved = load_model(outcome.model_path)
    assert saved.meta["round"] == 4 and saved.weights_hash == outcome.history[-1].weights_hash
    assert contributing_sites(outcome.history, int(saved.meta["round"])) == {"a", "b"}
    (note,) = training_notes(outcome)
    assert "no site released a validation loss" in note and "last round" in note
    assert "no early stopping" in note


def test_a_round_without_a_pooled_loss_neither_counts_towards_patience_nor_replaces_the_best_model(
    tmp_path: Path,
) -> None:
    from common.model import load_model
    from server.training import run_training, training_notes

    class SitesThatStopReleasing(FakeSites):
        """Release a validation loss in round 1 only, then withhold it."""

        rounds = 0

        def push_messages(self, messages: list[Message]) -> list[str]:
            self.rounds += 1
            if self.rounds == 2:
                self.metrics = WITHHOLDING
            return super().push_messages(messages)

    study = StudyConfig.from_run_config(SMALL_STUDY | {"study.num-rounds": 3, "train.patience": 1})
    outcome = run_training(SitesThatStopReleasing(SITE_METRICS), study, tmp_path, {1: "a", 2: "b"})  # type: ignore[arg-type]
    assert [r.round for r in outcome.history] == [1, 2, 3] and not outcome.stopped_early
    assert load_model(outcome.model_path).meta["round"] == 1  # the only round with a loss to judge it by
    (note,) = training_notes(outcome)
    assert "rounds 2, 3" in note and "no site released a validation loss" in note


def test_training_notes_say_when_training_stopped_early(tmp_path: Path) -> None:
    from server.training import run_training, training_notes

    study = StudyConfig.from_run_config(SMALL_STUDY | {"study.num-rounds": 4, "train.patience": 1})
    outcome = run_training(FakeSites(SITE_METRICS), study, tmp_path, {1: "a", 2: "b"})  # type: ignore[arg-type]
    assert outcome.stopped_early and [r.round for r in outcome.history] == [1, 2]  # same loss: no gain
    assert training_notes(outcome) == ["training stopped early on the pooled validation loss"]


def test_exclusion_note_names_excluded_names_that_no_site_answered_to() -> None:
    """A misspelt name in study.exclude-from-training excludes nobody: the report says so,
    instead of listing it among the excluded sites as if it had been applied."""
    from server.training import exclusion_note

    assert exclusion_note((), ["a", "b"]) is None
    note = exclusion_note(["hosp-b", "hosp-x"], ["hosp-a", "hosp-b"])
    assert note is not None
    kept, absent = note.split("; ")
    assert kept == "excluded from training (validated only): hosp-b"
    assert "no site of that name answered: hosp-x " in absent
    only_absent = exclusion_note(["hosp-B"], ["hosp-a", "hosp-b"])
    assert only_absent is not None and "validated only): none of the sites that answered" in only_absent


def test_the_round_record_and_the_report_say_what_each_site_trained_on(tmp_path: Path) -> None:
    from protocols.report import StudyReport
    from server.report.document import _appendix
    from server.report.render import render_markdown
    from server.training import run_training

    study = StudyConfig.from_run_config(SMALL_STUDY | {"study.num-rounds": 1})
    # site 2's record is not a device and precision: the study goes on, the record says nothing of it
    grid = FakeSites(SITE_METRICS, compute={1: ("cpu", "bf16"), 2: ("gpu", "fp64")})
    (record,) = run_training(grid, study, tmp_path, {1: "a", 2: "b"}).history  # type: ignore[arg-type]
    assert record.compute == {"a": "cpu bf16"}
    report_json = Path(__file__).parent / "data" / "report" / "evaluate_with_training.json"
    report = StudyReport.model_validate_json(report_json.read_text(encoding="utf-8"))
    site = report.sites[0].site
    report = report.model_copy(
        update={"training": [record.model_copy(update={"compute": {site: "cuda fp16"}})]}
    )
    text = render_markdown(_appendix(report), {"training_loss": "training_loss.svg"})
    assert f"{site}: node" in text and "trained on cuda fp16" in text
