"""The site's training policy: policy.toml's [training], [bounds] and [dp-sgd] tables, and how
the guard enforces them on a training reply (withheld validation, bounds, DP-SGD)."""

from __future__ import annotations

from pathlib import Path

import pytest
from guard_sites import APP, guard, small_site

from client.audit import audit_path, read_audit
from client.guard import SiteRefusal, bounds_refusal, open_guard, withheld_validation
from client.policy import (
    DEFAULT_MIN_VAL_PATIENTS,
    DpSgd,
    SitePolicy,
    TrainingReplies,
    load_policy,
    write_policy,
)
from common.errors import SiteFolderError
from protocols import keys
from protocols.model import ModelSpec
from protocols.study import StudyConfig, TrainSection


def test_training_tables_default_to_the_safe_policy(tmp_path: Path) -> None:
    policy = load_policy(tmp_path)
    assert policy.training.min_val_patients == DEFAULT_MIN_VAL_PATIENTS == 5
    assert policy.min_val_slices == policy.min_slices == 5  # absent: the site's min-slices
    assert policy.training.batchnorm_stats == "recompute"
    assert policy.bounds == {}
    assert policy.dp_sgd.enabled is False and policy.dp_sgd.max_epsilon == 10.0
    assert SitePolicy(min_slices=9).min_val_slices == 9


def test_training_tables_are_read_in_kebab_case(tmp_path: Path) -> None:
    (tmp_path / "policy.toml").write_text(
        '[training]\nmin-val-patients = 8\nmin-val-slices = 12\nbatchnorm-stats = "received"\n'
        '[bounds]\n"train.val-fraction" = [0.1, 0.5]\n"train.seed" = [3, 3]\n'
        "[dp-sgd]\nenabled = true\nnoise-multiplier = 1.5\nmax-grad-norm = 0.5\ntarget-delta = 1e-6\n"
        "max-epsilon = 4.0\n",
        encoding="utf-8",
    )
    policy = load_policy(tmp_path)
    assert policy.training == TrainingReplies(
        min_val_patients=8, min_val_slices=12, batchnorm_stats="received"
    )
    assert policy.min_val_slices == 12
    assert policy.bounds == {"train.val-fraction": (0.1, 0.5), "train.seed": (3.0, 3.0)}
    assert policy.dp_sgd == DpSgd(
        enabled=True, noise_multiplier=1.5, max_grad_norm=0.5, target_delta=1e-6, max_epsilon=4.0
    )


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("[training]\nmin-val-patient = 3\n", "min-val-patient"),
        ("[training]\nmin-val-patients = 0\n", "min-val-patients"),
        ('[training]\nbatchnorm-stats = "drop"\n', "batchnorm-stats"),
        ('[bounds]\n"train.val-fractoin" = [0.1, 0.5]\n', "train.val-fractoin"),
        ('[bounds]\n"train.optimizer" = [0, 1]\n', "not numeric run-config keys"),
        ('[bounds]\n"train.val-fraction" = [0.5, 0.1]\n', "lowest first"),
        ("[dp-sgd]\ntarget-delta = 1.5\n", "target-delta"),
        ("[dp-sgd]\nnoise-multiplier = 0\n", "noise-multiplier"),
    ],
)
def test_invalid_training_tables_name_the_key(tmp_path: Path, text: str, names: str) -> None:
    (tmp_path / "policy.toml").write_text(text, encoding="utf-8")
    with pytest.raises(SiteFolderError) as info:
        load_policy(tmp_path)
    assert "policy.toml" in str(info.value) and names in str(info.value)


def test_written_training_tables_read_back_identically(tmp_path: Path) -> None:
    for policy in (
        SitePolicy(),
        SitePolicy(
            training=TrainingReplies(min_val_patients=10, min_val_slices=20, batchnorm_stats="local"),
            bounds={"train.val-fraction": (0.15, 0.4), "train.local-epochs": (1, 2)},
            dp_sgd=DpSgd(enabled=True, noise_multiplier=0.8, target_delta=1e-7),
        ),
    ):
        write_policy(tmp_path, policy)
        assert load_policy(tmp_path) == policy


# ------------------------------------------------------------------ bounds


def study(**flat: object) -> StudyConfig:
    return StudyConfig.from_run_config(flat)  # type: ignore[arg-type]


def test_bounds_are_inclusive_and_the_reason_names_key_value_and_bound() -> None:
    policy = SitePolicy(bounds={"train.val-fraction": (0.1, 0.5), "train.local-epochs": (1, 3)})
    assert bounds_refusal(policy, study()) is None  # the defaults (0.2, 1) are inside
    assert bounds_refusal(policy, study(**{"train.val-fraction": 0.1})) is None
    assert bounds_refusal(policy, study(**{"train.val-fraction": 0.5})) is None
    reason = bounds_refusal(policy, study(**{"train.val-fraction": 0.05}))
    assert reason is not None
    assert "train.val-fraction = 0.05" in reason and "[0.1, 0.5]" in reason and "policy.toml" in reason
    reason = bounds_refusal(policy, study(**{"train.local-epochs": 50}))
    assert reason is not None and "train.local-epochs = 50" in reason and "[1, 3]" in reason
    assert bounds_refusal(SitePolicy(), study(**{"train.val-fraction": 0.01})) is None  # no bounds


@pytest.fixture
def site(tmp_path: Path) -> Path:
    return small_site(
        tmp_path / "hospital-t", "image,label,group\nimages/a.dcm,labels/a.png,p1\n", "hospital-t"
    )


def test_an_instruction_outside_the_bounds_is_refused_before_anything_runs(site: Path) -> None:
    write_policy(site, SitePolicy(bounds={"train.val-fraction": (0.1, 0.5)}))
    bad = study(**{"train.val-fraction": 0.01})
    with pytest.raises(SiteRefusal, match=r"train\.val-fraction = 0\.01 .*\[0\.1, 0\.5\]"):
        open_guard(site, run_id=1, task="train", config={keys.TASK: "train"}, app_hash=APP, study=bad)
    events = [e.event for e in read_audit(audit_path(site))]
    assert events == ["received", "refused"]
    open_guard(site, run_id=1, task="train", config={keys.TASK: "train"}, app_hash=APP, study=study())


# ------------------------------------------------------------------ the validation minimums


VAL = {
    keys.N_VAL: 6.0,
    keys.N_VAL_PATIENTS: 5.0,
    keys.VAL_LOSS: 0.5,
    keys.VAL_LOSS_SUM: 3.0,
    **{k: 10.0 for cls in ("muscle", "msv") for k in keys.val_overlap_keys(cls)},
}


def test_validation_is_withheld_below_either_minimum() -> None:
    policy = SitePolicy()
    assert withheld_validation(VAL, policy) is None  # 5 patients, 6 slices: enough
    one = withheld_validation({**VAL, keys.N_VAL_PATIENTS: 1.0}, policy)
    assert (
        one is not None
        and "1 patient(s)" in one
        and "min-val-patients" in one
        and "train.val-fraction" in one
    )
    assert withheld_validation({**VAL, keys.N_VAL: 4.0}, policy) is not None  # slices: min-slices 5
    assert withheld_validation(VAL, SitePolicy(training=TrainingReplies(min_val_slices=7))) is not None
    unsaid = {k: v for k, v in VAL.items() if k != keys.N_VAL_PATIENTS}
    assert withheld_validation(unsaid, policy) is not None  # no patient count: not released
    assert withheld_validation({keys.N_VAL: 0.0, keys.N_VAL_PATIENTS: 0.0}, policy) is None  # no validation


def test_release_withholds_small_validation_and_marks_the_reply(site: Path) -> None:
    g = guard(site, "train")
    base = {keys.NUM_EXAMPLES: 9.0, keys.TRAIN_LOSS: 0.4}
    assert g.release_weights(9, "c" * 64, {**base, **VAL}) == {**base, **VAL}
    out = g.release_weights(9, "c" * 64, {**base, **VAL, keys.N_VAL_PATIENTS: 2.0})
    assert out == {**base, keys.N_VAL: 6.0, keys.N_VAL_PATIENTS: 2.0, keys.VAL_WITHHELD: 1.0}
    sent = [e for e in read_audit(audit_path(site)) if e.event == "sent"]
    assert sent[0].payload["validation_withheld"] is None
    assert "2 patient(s)" in sent[1].payload["validation_withheld"]
    assert keys.VAL_LOSS_SUM not in sent[1].payload["metrics"]  # what left is what was logged


def test_dp_sgd_sites_release_only_private_rounds_within_their_epsilon_cap(site: Path) -> None:
    g = guard(site, "train", dp_sgd=DpSgd(enabled=True, max_epsilon=5.0))
    base = {keys.NUM_EXAMPLES: 9.0}
    with pytest.raises(SiteRefusal, match="requires DP-SGD"):
        g.release_weights(9, "c" * 64, base)
    with pytest.raises(SiteRefusal, match=r"epsilon 7\.5 .*max-epsilon 5 .*lower train\.local-epochs"):
        g.release_weights(9, "c" * 64, {**base, keys.DP_EPSILON: 7.5, keys.DP_DELTA: 1e-5})
    out = g.release_weights(9, "c" * 64, {**base, keys.DP_EPSILON: 2.5, keys.DP_DELTA: 1e-5})
    assert out[keys.DP_EPSILON] == 2.5
    sent = [e for e in read_audit(audit_path(site)) if e.event == "sent"][-1]
    assert sent.payload["dp_sgd"]["max_epsilon"] == 5.0


def test_dp_sgd_sites_refuse_batchnorm_studies_before_training(site: Path) -> None:
    g = guard(site, "train", dp_sgd=DpSgd(enabled=True))
    with pytest.raises(SiteRefusal, match=r"BatchNorm.*model\.norm = 'group'"):
        g.check_training(ModelSpec(norm="batch"), TrainSection(), n_train=24)
    g.check_training(ModelSpec(norm="group"), TrainSection(), n_train=24)
    without = guard(site, "train", dp_sgd=DpSgd(enabled=False))
    without.check_training(ModelSpec(norm="batch"), TrainSection(), n_train=24)  # without DP-SGD: either
