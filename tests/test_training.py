"""common.training: grouped split, FedProx term, loss/counts sufficient statistics, local training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from training_toys import Tiny, phantom

from common.model import ModelSpec, build_model, weights_hash
from common.training import (
    TrainConfig,
    TrainSample,
    _augment,
    evaluate_loss,
    proximal_term,
    train_local,
)
from protocols.classes import METRIC_CLASSES
from protocols.study import StudyConfig, TrainSection

SPEC = ModelSpec(encoder="resnet18", image_size=64)


def test_train_config_is_the_study_train_section_plus_local_settings() -> None:
    study = StudyConfig.from_run_config(
        {
            "train.lr": 0.01,
            "train.batch-size": 2,
            "train.optimizer": "adam",
            "train.local-epochs": 3,
            "train.augment": True,
        }
    )
    config = TrainConfig.from_study(study.train, proximal_mu=0.1)
    assert config.model_dump(include=set(TrainSection.model_fields)) == study.train.model_dump()
    # augmentation is the study's choice (the demo study sets it), carried to every site's trainer
    assert (config.proximal_mu, config.augment, config.max_grad_norm) == (0.1, True, None)
    assert TrainSection().augment is False  # the seed's recipe: no augmentation
    # the recipe's defaults are the study's (one owner), only the site-local settings are added
    assert TrainConfig() == TrainConfig.from_study(TrainSection())
    assert set(TrainConfig.model_fields) - set(TrainSection.model_fields) == {
        "proximal_mu",
        "max_grad_norm",
    }
    with pytest.raises(ValidationError):
        TrainConfig.from_study(study.train, proximal_mu=-1.0)
    with pytest.raises(ValidationError):
        TrainConfig.from_study(study.train, momentum=0.9)  # no such setting: refused, not ignored


class HalfMuscle(torch.nn.Module):
    """Predicts muscle on the left half of the image and background elsewhere, whatever the input."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(x.shape[0], 4, *x.shape[2:])
        logits[:, 1, :, : x.shape[-1] // 2] = 10.0
        logits[:, 0, :, x.shape[-1] // 2 :] = 10.0
        return logits + self.dummy


# ------------------------------------------------------------------------- split


# ------------------------------------------------------------------------- FedProx


def test_proximal_term_zero_at_global_and_hand_checked_otherwise() -> None:
    model = torch.nn.Linear(2, 1)
    global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert float(proximal_term(model, global_state, 0.5).detach()) == 0.0
    with torch.no_grad():
        model.weight += torch.tensor([[1.0, 2.0]])  # squared distance 1 + 4 = 5
    assert float(proximal_term(model, global_state, 0.5).detach()) == pytest.approx(0.5 / 2 * 5)
    with pytest.raises(ValueError, match="'bias'"):
        proximal_term(model, {"weight": global_state["weight"]}, 0.1)


def test_fedprox_keeps_local_weights_closer_to_global() -> None:
    samples = [phantom(i) for i in range(4)]
    distances = {}
    for mu in (0.0, 50.0):
        torch.manual_seed(0)
        model = Tiny()
        start = {k: v.detach().clone() for k, v in model.state_dict().items()}
        config = TrainConfig(local_epochs=3, lr=1e-2, proximal_mu=mu, batch_size=2)
        train_local(model, SPEC, samples, [], config, global_state=start)
        distances[mu] = float(proximal_term(model, start, 2.0).detach())  # = ||w - w0||^2
    assert 0 < distances[50.0] < distances[0.0]


def test_fedprox_needs_global_state() -> None:
    with pytest.raises(ValueError, match="global_state"):
        train_local(Tiny(), SPEC, [phantom(0)], [], TrainConfig(proximal_mu=0.1))


# ------------------------------------------------------------------------- evaluation statistics


def test_evaluate_loss_counts_are_hand_checkable() -> None:
    sample = phantom(0, size=64)
    sample.label[:] = 0
    sample.label[:, :16] = 1  # muscle on the left quarter; model predicts the left half
    loss_sum, n, counts = evaluate_loss(HalfMuscle(), SPEC, [sample, sample], TrainConfig(batch_size=2))
    assert n == 2 and loss_sum > 0
    assert set(counts) == set(METRIC_CLASSES)
    assert counts["muscle"] == (2 * 64 * 16, 2 * 64 * 32)
    assert counts["subcutaneous_fat"] == (0, 0) and counts["visceral_fat"] == (0, 0)
    assert counts["msv"] == counts["muscle"]
    # per-slice loss sum: same total whatever the batching
    again, _, _ = evaluate_loss(HalfMuscle(), SPEC, [sample, sample], TrainConfig(batch_size=1))
    assert again == pytest.approx(loss_sum)


def test_augment_keeps_image_and_mask_aligned() -> None:
    sample = phantom(3)
    image = torch.from_numpy((sample.label > 0).astype(np.float32))[None, None].repeat(4, 1, 1, 1)
    labels = torch.from_numpy(sample.label.astype(np.int64))[None].repeat(4, 1, 1)
    out_img, out_lab = _augment(image, labels, torch.Generator().manual_seed(0))
    assert torch.equal(out_img[:, 0] > 0, out_lab > 0)
    assert not torch.equal(out_lab, labels)  # something moved


# ------------------------------------------------------------------------- train_local


def test_train_local_rejects_unmapped_labels_and_shape_mismatch() -> None:
    bad = phantom(0)
    bad.label[0, 0] = 7  # a raw site value that was never mapped to canonical
    with pytest.raises(ValueError, match=r"sample 1 \(group 'p0'\).*value 7"):
        train_local(Tiny(), SPEC, [phantom(1), bad], [], TrainConfig())
    crooked = TrainSample(hu=np.zeros((8, 8), np.float32), label=np.zeros((8, 9), np.uint8), group="x")
    with pytest.raises(ValueError, match=r"\(8, 9\)"):
        train_local(Tiny(), SPEC, [phantom(1)], [crooked], TrainConfig())


def test_train_local_result_fields_and_determinism() -> None:
    samples = [phantom(i) for i in range(5)]
    config = TrainConfig(local_epochs=2, lr=1e-2, batch_size=2, seed=3, augment=True, max_grad_norm=5.0)
    results = []
    for _ in range(2):
        torch.manual_seed(99)  # same init; train_local must not depend on the global RNG state after
        model = Tiny()
        results.append(train_local(model, SPEC, samples[:3], samples[3:], config))
    a, b = results
    assert weights_hash(a.state_dict) == weights_hash(b.state_dict)
    assert (a.n_train, a.n_val, a.epochs, len(a.epoch_losses)) == (3, 2, 2, 2)
    assert a.train_loss_mean == pytest.approx(a.train_loss_sum / 3)
    assert a.val_loss_mean is not None and a.val_loss_mean == pytest.approx(a.val_loss_sum / 2)
    assert set(a.val_counts) == set(METRIC_CLASSES)
    inter, union = a.val_counts["msv"]
    assert 0 <= inter <= union
    no_val = train_local(Tiny(), SPEC, samples[:3], [], TrainConfig(lr=1e-2))
    assert no_val.n_val == 0 and no_val.val_loss_mean is None
    assert all(v == (0, 0) for v in no_val.val_counts.values())


@pytest.mark.slow
def test_train_local_lowers_training_loss_of_the_unet() -> None:
    samples = [phantom(i) for i in range(4)]
    torch.manual_seed(0)
    model = build_model(SPEC)
    before, _, _ = evaluate_loss(model, SPEC, samples, TrainConfig())
    config = TrainConfig(local_epochs=5, batch_size=2)  # the seed's RMSprop, lr 2e-4
    result = train_local(model, SPEC, samples, samples, config)
    assert result.epoch_losses[-1] < 0.7 * result.epoch_losses[0], result.epoch_losses
    # the returned weights are the trained model's, in eval mode they also score better
    assert result.val_loss_sum < before


def test_ignored_pixels_are_left_out_of_the_validation_counts() -> None:
    """evaluate_loss pools (intersection, union) over the pixels the samples keep only."""
    import numpy as np
    import torch

    from common.model import ModelSpec, build_model
    from common.training import TrainConfig, TrainSample, evaluate_loss

    torch.manual_seed(0)
    spec = ModelSpec(encoder="resnet18", image_size=32)
    model = build_model(spec)
    hu = np.random.default_rng(0).normal(0, 100, (32, 32)).astype(np.float32)
    label = np.ones((32, 32), dtype=np.uint8)
    half = np.zeros((32, 32), dtype=bool)
    half[:, 16:] = True
    plain = evaluate_loss(model, spec, [TrainSample(hu, label, "p", (1.0, 1.0))], TrainConfig())
    masked = evaluate_loss(model, spec, [TrainSample(hu, label, "p", (1.0, 1.0), half)], TrainConfig())
    assert plain[2]["muscle"][1] >= 32 * 32  # every pixel is muscle in the label: union = all
    assert masked[2]["muscle"][1] == 32 * 16  # half of them ignored
