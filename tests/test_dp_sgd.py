"""common.dp_sgd: DP-SGD with Opacus on the study's U-Net (GroupNorm), its accounting and limits."""

from __future__ import annotations

import pytest
import torch
from training_toys import phantom

from common.dp_sgd import PrivateTraining, per_slice_loss, planned_epsilon, steps_per_epoch
from common.loss import SeedLoss
from common.model import ModelSpec, build_model, weights_hash
from common.training import TrainConfig, train_local

GROUP = ModelSpec(encoder="resnet18", image_size=64, norm="group")
PRIVATE = PrivateTraining(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5)


SAMPLES = [phantom(i) for i in range(6)]
CONFIG = TrainConfig(local_epochs=1, batch_size=3, seed=0)


def test_a_tiny_dp_sgd_round_trains_the_group_norm_unet_and_reports_its_epsilon() -> None:
    torch.manual_seed(0)
    model = build_model(GROUP)
    before = weights_hash(model.state_dict())
    result = train_local(model, GROUP, SAMPLES[:4], SAMPLES[4:], CONFIG, private=PRIVATE)
    assert result.epsilon == pytest.approx(planned_epsilon(PRIVATE, 4, 3, 1)) and result.epsilon > 0
    assert result.delta == PRIVATE.delta
    assert weights_hash(result.state_dict) != before
    assert all(torch.isfinite(t).all() for t in result.state_dict.values())
    assert set(result.state_dict) == set(build_model(GROUP).state_dict())  # no Opacus wrapper names
    assert result.n_val == 2 and result.val_loss_mean is not None
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())


def test_the_noise_is_not_replayable_from_the_study_seed() -> None:
    """Same weights, same data, same train.seed: a coordinator could otherwise regenerate the
    noise and subtract it. Two DP-SGD rounds must differ; two plain rounds do not."""
    hashes = []
    for private in (PRIVATE, PRIVATE, None, None):
        torch.manual_seed(0)
        model = build_model(GROUP)
        hashes.append(
            weights_hash(train_local(model, GROUP, SAMPLES[:3], [], CONFIG, private=private).state_dict)
        )
    assert hashes[0] != hashes[1] and hashes[2] == hashes[3]


def test_a_batchnorm_model_cannot_be_trained_privately_and_says_why() -> None:
    torch.manual_seed(0)
    model = build_model(ModelSpec(encoder="resnet18", image_size=64))
    with pytest.raises(ValueError, match=r"BatchNorm.*model\.norm = 'group'"):
        train_local(model, GROUP, SAMPLES[:3], [], CONFIG, private=PRIVATE)


def test_an_empty_poisson_batch_is_a_step_of_noise_that_is_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    import opacus.utils.uniform_sampler as sampler_module

    class EmptyFirst:
        def __init__(self, *, num_samples: int, sample_rate: float, generator: torch.Generator) -> None:
            self.n = num_samples

        def __iter__(self):  # type: ignore[no-untyped-def]
            yield []
            yield list(range(self.n))

    monkeypatch.setattr(sampler_module, "UniformWithReplacementSampler", EmptyFirst)
    torch.manual_seed(0)
    model = build_model(GROUP)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = TrainConfig(local_epochs=1, batch_size=2, seed=0)
    result = train_local(model, GROUP, SAMPLES[:4], [], config, private=PRIVATE)
    assert result.epsilon == pytest.approx(planned_epsilon(PRIVATE, 4, 2, 1))  # 2 steps, both counted
    assert any(not torch.equal(before[k], v) for k, v in result.state_dict.items())


def test_the_loss_of_one_slice_never_sees_another() -> None:
    """The seed loss pools Dice over the batch; DP-SGD's loss is the mean of per-slice losses."""
    loss_fn = SeedLoss()
    logits = torch.randn(2, 4, 8, 8, requires_grad=True)
    labels = torch.randint(0, 4, (2, 8, 8))
    expected = (loss_fn(logits[:1], labels[:1]) + loss_fn(logits[1:], labels[1:])) / 2
    assert torch.allclose(per_slice_loss(loss_fn, logits, labels), expected)
    loss_fn(logits[:1], labels[:1]).backward()
    assert logits.grad is not None and torch.count_nonzero(logits.grad[1]) == 0


def test_planned_epsilon_follows_noise_epochs_and_batch() -> None:
    assert steps_per_epoch(10, 4) == 3 and steps_per_epoch(1, 4) == 1
    base = planned_epsilon(PRIVATE, 100, 4, 1)
    assert planned_epsilon(PRIVATE, 100, 4, 3) > base  # more epochs spend more
    assert planned_epsilon(PRIVATE, 100, 2, 1) < base  # smaller batches (rarer sampling) spend less
    assert planned_epsilon(PrivateTraining(2.0, 1.0, 1e-5), 100, 4, 1) < base  # more noise, less
    assert planned_epsilon(PrivateTraining(1.0, 1.0, 1e-3), 100, 4, 1) < base  # looser delta, less
    with pytest.raises(ValueError, match="delta"):
        PrivateTraining(1.0, 1.0, 0.0)
