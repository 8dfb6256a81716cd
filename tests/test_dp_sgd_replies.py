"""What a DP-SGD site sends (``[dp-sgd]`` in policy.toml): only numbers the round's epsilon covers
or the site's other rules allow, and no round that is planned to spend more than ``max-epsilon``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fixtures_site import make_site
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from guard_sites import APP

from client import app, site_tasks
from client.audit import audit_path, read_audit
from client.guard import SiteRefusal, open_guard
from client.policy import DpSgd, SitePolicy, write_policy
from common.dataset import load_site
from common.dp_sgd import PrivateTraining, planned_epsilon
from common.model import ModelSpec, build_model, pack_state
from protocols import keys
from protocols.study import TrainSection

GROUP = ModelSpec(encoder="resnet18", image_size=32, norm="group")

pytestmark = pytest.mark.usefixtures("flower_task_identity")


def _guard(site: Path, policy: SitePolicy):
    write_policy(site, policy)
    opened = open_guard(site, run_id=3, task="train", config={keys.TASK: "train"}, app_hash=APP)
    opened.attach(load_site(site))
    return opened


def test_a_dp_sgd_round_never_releases_its_training_loss(tmp_path: Path) -> None:
    """The loss of the private steps is an exact function of the training slices, outside the
    round's epsilon: it stays at the site (the validation numbers follow the validation minimums)."""
    site = make_site(tmp_path, n=6, size=32)
    guard = _guard(site, SitePolicy(dp_sgd=DpSgd(enabled=True)))
    metrics = {
        keys.NUM_EXAMPLES: 6.0,
        keys.TRAIN_LOSS: 0.4321,
        keys.TRAIN_LOSS_SUM: 2.5926,
        keys.DP_EPSILON: 2.0,
        keys.DP_DELTA: 1e-5,
    }
    out = guard.release_weights(6, "c" * 64, metrics)
    assert keys.TRAIN_LOSS not in out and keys.TRAIN_LOSS_SUM not in out
    assert out[keys.DP_EPSILON] == 2.0 and out[keys.NUM_EXAMPLES] == 6.0
    sent = [e for e in read_audit(audit_path(site)) if e.event == "sent"][-1]
    assert "0.4321" not in str(sent.payload) and "2.5926" not in str(sent.payload)
    plain = _guard(site, SitePolicy()).release_weights(
        6, "c" * 64, {keys.NUM_EXAMPLES: 6.0, keys.TRAIN_LOSS: 0.4}
    )
    assert plain[keys.TRAIN_LOSS] == 0.4  # without DP-SGD the loss is an aggregate like the others


def test_check_training_refuses_a_round_planned_to_spend_more_than_max_epsilon(tmp_path: Path) -> None:
    site = make_site(tmp_path, n=6, size=32)
    train = TrainSection(local_epochs=4, batch_size=4)
    planned = planned_epsilon(PrivateTraining(1.0, 1.0, 1e-5), 24, 4, 4)
    guard = _guard(site, SitePolicy(dp_sgd=DpSgd(enabled=True, max_epsilon=planned * 0.9)))
    with pytest.raises(SiteRefusal, match=r"would spend epsilon .*max-epsilon") as refusal:
        guard.check_training(GROUP, train, n_train=24)
    assert f"{planned:.3g}" in refusal.value.reason
    _guard(site, SitePolicy(dp_sgd=DpSgd(enabled=True, max_epsilon=planned * 1.1))).check_training(
        GROUP, train, n_train=24
    )


def _train_message(site_dir: Path, config: dict[str, object]) -> tuple[Message, Context]:
    torch.manual_seed(0)
    packed, layout = pack_state(build_model(GROUP).state_dict())
    record = ConfigRecord(
        {
            keys.TASK: "train",
            keys.SERVER_ROUND: 1,
            keys.MODEL_SPEC: GROUP.model_dump_json(),
            keys.MODEL_LAYOUT: layout,
            **config,  # type: ignore[dict-item]
        }
    )
    content = RecordDict({keys.ARRAYS: ArrayRecord({keys.PACKED: Array(packed)}), keys.CONFIG: record})
    msg = Message(content, dst_node_id=1, message_type=MessageType.TRAIN)
    context = Context(
        run_id=7, node_id=1, node_config={"site-dir": str(site_dir)}, state=RecordDict(), run_config={}
    )
    return msg, context


def test_the_client_app_refuses_an_over_budget_round_before_building_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site_dir = make_site(tmp_path, n=8, size=32, name="hospital-dp-sgd")
    write_policy(site_dir, SitePolicy(dp_sgd=DpSgd(enabled=True, max_epsilon=0.01)))

    def never(*_: object, **__: object) -> object:
        raise AssertionError("the model was built (or trained) for a round the site refuses")

    monkeypatch.setattr(site_tasks, "load_state", never)
    monkeypatch.setattr(site_tasks, "run_train", never)
    msg, context = _train_message(site_dir, {"train.local-epochs": 2, "train.test-fraction": 0.2})
    reply = app._handle(msg, context, "train")
    assert reply.has_error() and reply.error.code == keys.ERROR_REFUSED, reply.error.reason
    assert "max-epsilon" in (reply.error.reason or "") and str(tmp_path) not in (reply.error.reason or "")
