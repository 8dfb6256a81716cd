"""Training replies against a curious coordinator, through the real ClientApp handler.

Attack 2 of issue 12: ``train.val-fraction=0.01`` puts one patient in a site's validation
split, and ``train.seed`` chooses which. The coordinator sends a model that predicts muscle
on every pixel and a learning rate too small to change it, so the reply's
``val-muscle-intersection`` is the validation patients' labelled muscle pixels at model
resolution. The attacker then looks the released count up among single patients' values
(computed here from each patient's slice with the site's own preprocessing). It must find
none: the counts are withheld, or they are sums over at least the site's minimum of patients.

Also here: the site's ``[bounds]`` on run-config values, and a site that requires DP-SGD
refusing a BatchNorm study and reporting the epsilon it spent on a GroupNorm one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from clientapp_messages import handle, metrics_of
from fixtures_site import make_site
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from client.audit import audit_path, read_audit
from client.policy import DpSgd, SitePolicy, TrainingReplies, write_policy
from client.site_tasks import training_samples
from common.dataset import load_site, row_group
from common.dp_sgd import PrivateTraining, planned_epsilon
from common.model import ModelSpec, build_model, pack_state
from common.preprocess import mask_to_size
from common.splits import split_site
from protocols import keys
from protocols.classes import Tissue
from protocols.study import TrainSection

SPEC = ModelSpec(encoder="resnet18", image_size=64)
PATIENTS = 12


pytestmark = pytest.mark.usefixtures("flower_task_identity")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Twelve patients, one 64-px slice each."""
    return make_site(tmp_path_factory.mktemp("replies"), n=PATIENTS, size=64, name="hospital-a")


def muscle_everywhere(spec: ModelSpec = SPEC) -> dict[str, torch.Tensor]:
    """The coordinator's model: the segmentation head ignores its input and says muscle."""
    torch.manual_seed(0)
    state = build_model(spec).state_dict()
    state["segmentation_head.0.weight"].zero_()
    bias = torch.zeros_like(state["segmentation_head.0.bias"])
    bias[int(Tissue.muscle)] = 100.0
    state["segmentation_head.0.bias"] = bias
    return state


def train(
    site_dir: Path,
    state: dict[str, torch.Tensor],
    spec: ModelSpec = SPEC,
    *,
    config: dict[str, object] | None = None,
    run_config: dict[str, object] | None = None,
    node_config: dict[str, object] | None = None,
) -> Message:
    """One training instruction through the ClientApp's handler, as Flower delivers it."""
    packed, layout = pack_state(state)
    record = ConfigRecord(
        {
            keys.TASK: "train",
            keys.SERVER_ROUND: 1,
            keys.MODEL_SPEC: spec.model_dump_json(),
            keys.MODEL_LAYOUT: layout,
            **(config or {}),  # type: ignore[dict-item]
        }
    )
    content = RecordDict({keys.ARRAYS: ArrayRecord({keys.PACKED: Array(packed)}), keys.CONFIG: record})
    node = {"site-dir": str(site_dir), **(node_config or {})}
    return handle("train", node, run_config=run_config, content=content)


def muscle_pixels_per_patient(site_dir: Path) -> dict[str, int]:
    """The truth the attacker is after: each patient's labelled muscle pixels at model resolution."""
    samples, _ = training_samples(load_site(site_dir))
    truth: dict[str, int] = {}
    for sample in samples:
        pixels = int((mask_to_size(sample.label, SPEC.image_size) == int(Tissue.muscle)).sum())
        truth[sample.group] = truth.get(sample.group, 0) + pixels
    return truth


def attack(metrics: dict[str, float], truth: dict[str, int]) -> list[str]:
    """The patients whose muscle pixel count the reply gives away (looked up, as an attacker would)."""
    count = metrics.get(keys.val_overlap_keys("muscle")[0])
    return [] if count is None else [group for group, value in truth.items() if value == count]


#: A split seed that puts 6 of the 12 patients in validation at val-fraction 0.5 (each patient's part
#: is a coin toss of its hash, so the count varies with the seed).
VAL6_SEED = 3
ATTACK = {"train.val-fraction": 0.01, "train.test-fraction": 0.01, "train.lr": 1e-9, "train.batch-size": 4}


def test_the_attack_reads_summed_muscle_pixels_from_a_large_enough_validation_split(site: Path) -> None:
    """The precondition of the attack: with a validation split the policy accepts, the reply's
    count is exactly the validation patients' muscle pixels summed (so it is what the attacker
    thinks it is), and it is a sum over at least five patients, which no single patient's
    value equals."""
    truth = muscle_pixels_per_patient(site)
    assert len(truth) == PATIENTS
    config = ATTACK | {"train.val-fraction": 0.5, "train.seed": VAL6_SEED}
    metrics = metrics_of(train(site, muscle_everywhere(), config=config))
    parsed = load_site(site)
    split = split_site(parsed, TrainSection(val_fraction=0.5, test_fraction=0.01, seed=VAL6_SEED))
    val_patients = {row_group(parsed, i) for i in split.val}
    assert metrics[keys.N_VAL_PATIENTS] == len(val_patients) >= 5
    assert metrics[keys.val_overlap_keys("muscle")[0]] == sum(truth[g] for g in val_patients)
    assert keys.VAL_WITHHELD not in metrics
    assert attack(metrics, truth) == []


@pytest.mark.parametrize("seed", [0, 1])
def test_a_one_patient_validation_split_gives_no_patient_away(site: Path, seed: int) -> None:
    truth = muscle_pixels_per_patient(site)
    reply = train(site, muscle_everywhere(), config=ATTACK | {"train.seed": seed})
    metrics = metrics_of(reply)  # the site trains: the split is deterministic, and so is its answer
    assert attack(metrics, truth) == []
    assert metrics.get(keys.VAL_LOSS_SUM) is None or metrics[keys.N_VAL_PATIENTS] >= 5
    # this site's answer: the weights leave, the validation sums do not, and the reply says so
    assert metrics[keys.VAL_WITHHELD] == 1.0 and metrics[keys.N_VAL_PATIENTS] == 1
    assert not set(keys.VAL_METRIC_KEYS) & set(metrics)
    assert reply.content.array_records[keys.ARRAYS][keys.PACKED].numpy().size > 0
    sent = [e for e in read_audit(audit_path(site)) if e.event == "sent" and e.task == "train"][-1]
    assert "min-val-patients" in sent.payload["validation_withheld"]  # the site's own record says why


def test_the_sites_own_minimum_wins_over_a_smaller_one(site: Path) -> None:
    """min-val-patients is the site's: with 7 required, a 6-patient validation split is withheld too."""
    write_policy(site, SitePolicy(training=TrainingReplies(min_val_patients=7)))
    try:
        config = ATTACK | {"train.val-fraction": 0.5, "train.seed": VAL6_SEED}
        metrics = metrics_of(train(site, muscle_everywhere(), config=config))
    finally:
        (site / "policy.toml").unlink()
    assert metrics[keys.N_VAL_PATIENTS] == 6 and metrics[keys.VAL_WITHHELD] == 1.0
    assert attack(metrics, muscle_pixels_per_patient(site)) == []


@pytest.mark.parametrize("where", ["instruction", "run_config"])
def test_run_config_outside_the_sites_bounds_is_refused_naming_key_value_and_bound(
    tmp_path: Path, where: str
) -> None:
    site_dir = make_site(tmp_path, n=6, size=32, name="hospital-b")
    write_policy(site_dir, SitePolicy(bounds={"train.val-fraction": (0.1, 0.5)}))
    setting = {"train.val-fraction": 0.01}
    reply = train(
        site_dir,
        muscle_everywhere(),
        config=setting if where == "instruction" else None,
        run_config=setting if where == "run_config" else None,
    )
    assert reply.has_error() and reply.error.code == keys.ERROR_REFUSED
    reason = reply.error.reason or ""
    assert "train.val-fraction = 0.01" in reason and "[0.1, 0.5]" in reason and "[bounds]" in reason
    assert str(tmp_path) not in reason
    refused = [e for e in read_audit(audit_path(site_dir)) if e.event == "refused"]
    assert refused and "train.val-fraction" in (refused[-1].detail or "")


def test_a_site_requiring_dp_sgd_refuses_a_batchnorm_study_with_the_reason(tmp_path: Path) -> None:
    site_dir = make_site(tmp_path, n=6, size=32, name="hospital-c")
    write_policy(site_dir, SitePolicy(dp_sgd=DpSgd(enabled=True)))
    reply = train(site_dir, muscle_everywhere())
    assert reply.has_error() and reply.error.code == keys.ERROR_REFUSED
    reason = reply.error.reason or ""
    assert "DP-SGD" in reason and "BatchNorm" in reason and "model.norm = 'group'" in reason


GROUP = ModelSpec(encoder="resnet18", image_size=64, norm="group")


def test_a_dp_sgd_site_trains_a_group_norm_study_and_reports_the_epsilon_spent(tmp_path: Path) -> None:
    site_dir = make_site(tmp_path, n=8, size=64, name="hospital-d")
    policy = SitePolicy(dp_sgd=DpSgd(enabled=True, noise_multiplier=1.2, max_grad_norm=1.0))
    write_policy(site_dir, policy)
    torch.manual_seed(0)
    state = build_model(GROUP).state_dict()
    config = {"train.val-fraction": 0.0, "train.test-fraction": 0.2, "train.batch-size": 2}
    metrics = metrics_of(train(site_dir, state, GROUP, config=config))
    n_train = int(metrics[keys.NUM_EXAMPLES])
    private = PrivateTraining(1.2, 1.0, policy.dp_sgd.target_delta)
    expected = planned_epsilon(private, n_train, batch_size=2, epochs=1)
    assert metrics[keys.DP_EPSILON] == pytest.approx(expected) and 0 < expected < policy.dp_sgd.max_epsilon
    assert metrics[keys.DP_DELTA] == policy.dp_sgd.target_delta

    # a round that would spend more than the site's cap is refused, and nothing leaves
    write_policy(site_dir, policy.model_copy(update={"dp_sgd": DpSgd(enabled=True, max_epsilon=0.01)}))
    reply = train(site_dir, state, GROUP, config=config)
    assert reply.has_error() and reply.error.code == keys.ERROR_REFUSED
    assert "max-epsilon" in (reply.error.reason or "")


def test_weights_released_with_the_received_batchnorm_statistics_when_the_site_says_so(
    tmp_path: Path,
) -> None:
    site_dir = make_site(tmp_path, n=8, size=64, name="hospital-e")
    write_policy(site_dir, SitePolicy(training=TrainingReplies(batchnorm_stats="received")))
    torch.manual_seed(0)
    state = build_model(SPEC).state_dict()
    reply = train(site_dir, state, config={"train.val-fraction": 0.0})
    metrics_of(reply)
    from common.model import unpack_state

    _, layout = pack_state(state)
    back = unpack_state(reply.content.array_records[keys.ARRAYS][keys.PACKED].numpy(), layout)
    stats = [n for n in state if n.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(back[n], state[n]) for n in stats)
    weights = [n for n in state if n.endswith("conv1.weight")]
    assert any(not torch.equal(back[n], state[n]) for n in weights)  # it did train
    assert np.isfinite(reply.content.array_records[keys.ARRAYS][keys.PACKED].numpy()).all()


def test_a_training_reply_says_what_it_ran_on_and_the_site_choice_wins(site: Path) -> None:
    """The reply's ``compute`` record names the device and precision; the study asks for bf16, the
    site's node config says fp32, and the site's choice is what it used (and what it says)."""
    study = {"compute.device": "cpu", "compute.precision": "bf16"}
    reply = train(
        site, muscle_everywhere(), config=ATTACK, run_config=study, node_config={"precision": "fp32"}
    )
    metrics_of(reply)  # released
    used = reply.content.config_records[keys.COMPUTE]
    assert (used[keys.COMPUTE_DEVICE], used[keys.COMPUTE_PRECISION]) == ("cpu", "fp32")
    refused = train(site, muscle_everywhere(), config=ATTACK, node_config={"device": "tpu"})
    assert refused.has_error() and "node config's 'device'" in refused.error.reason
