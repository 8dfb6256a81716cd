"""Training-study glue: Flower's FedAvg weighted by training slices, pooled validation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict

from client.site_tasks import run_train
from common.dataset import load_site
from common.demo.hospitals import make_site, site_profile
from common.model import ModelSpec, build_model
from protocols import keys
from protocols.study import StudyConfig
from server.messaging import Replies
from server.training import make_strategy, pooled_validation


@pytest.fixture(autouse=True)
def _task_identity():
    """Messages built outside a Flower process need the identity Flower would have set."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


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
