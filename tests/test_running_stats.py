"""common.running_stats: which BatchNorm statistics the weights a site sends back carry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from training_toys import Tiny

from common.model import ModelSpec, build_model
from common.preprocess import to_model_input
from common.running_stats import apply_running_stats, running_stat_names
from common.training import TrainConfig, TrainSample, train_local

SPEC = ModelSpec(encoder="resnet18", image_size=32)


def sample(seed: int, size: int = 32) -> TrainSample:
    """A slice whose intensity differs from slice to slice (so the last one would show)."""
    rng = np.random.default_rng(seed)
    label = np.zeros((size, size), dtype=np.uint8)
    label[size // 4 : size // 2, size // 4 : -size // 4] = 1
    hu = np.where(label == 1, 50.0, -100.0 + 40.0 * seed).astype(np.float32)
    hu += rng.normal(0, 10, size=hu.shape).astype(np.float32)
    return TrainSample(hu=hu, label=label, group=f"p{seed}")


SAMPLES = [sample(i) for i in range(5)]


def trained(rule: str, seed: int = 0, lr: float = 1e-2) -> tuple[Tiny, dict[str, torch.Tensor]]:
    torch.manual_seed(7)
    model = Tiny()
    received = {k: v.detach().clone() for k, v in model.state_dict().items()}
    config = TrainConfig(local_epochs=2, batch_size=1, lr=lr, seed=seed)
    train_local(model, SPEC, SAMPLES, [], config, global_state=received, running_stats=rule)  # type: ignore[arg-type]
    return model, received


def test_recomputed_statistics_are_the_plain_average_over_every_training_slice() -> None:
    """Hand-checkable: the first BatchNorm's running mean is the mean over the training slices of
    each slice's mean first-conv output (no slice weighs more than another, not even the two of
    the last batch, [3, 4], which training merges so no batch holds one slice); its variance is
    the slice-weighted mean of the batches' (unbiased) variances."""
    model, _ = trained("recompute")
    conv, bn = model.net[0], model.net[1]
    with torch.no_grad():
        outputs = [conv(to_model_input(s.hu, SPEC.image_size, SPEC.hu_window)[None]) for s in SAMPLES]
    means = torch.stack([o.mean(dim=(0, 2, 3)) for o in outputs])
    assert torch.allclose(bn.running_mean, means.mean(0), atol=1e-5)
    batches = [outputs[0], outputs[1], outputs[2], torch.cat(outputs[3:])]
    variances = torch.stack([len(b) * b.var(dim=(0, 2, 3), unbiased=True) for b in batches])
    assert torch.allclose(bn.running_var, variances.sum(0) / len(SAMPLES), atol=1e-5)
    assert int(bn.num_batches_tracked) == len(batches)


def test_recomputed_statistics_do_not_depend_on_the_coordinators_batch_order() -> None:
    """train.seed orders the batches; PyTorch's moving average weighs the last ones most, so the
    'local' statistics change with the seed, the recomputed ones do not (the weights barely move)."""
    local = [trained("local", seed, lr=1e-12)[0].net[1].running_mean for seed in (0, 1)]
    assert not torch.allclose(local[0], local[1], atol=1e-3)
    recomputed = [trained("recompute", seed, lr=1e-12)[0].net[1].running_mean for seed in (0, 1)]
    assert torch.allclose(recomputed[0], recomputed[1], atol=1e-5)


def test_received_statistics_are_sent_back_unchanged_while_the_weights_train() -> None:
    model, received = trained("received")
    state = model.state_dict()
    names = running_stat_names(model)
    assert names == ["net.1.running_mean", "net.1.running_var", "net.1.num_batches_tracked"]
    assert all(torch.equal(state[n], received[n]) for n in names)
    assert not torch.equal(state["net.0.weight"], received["net.0.weight"])
    with pytest.raises(ValueError, match="received"):
        apply_running_stats(Tiny(), "received")
    with pytest.raises(ValueError, match="valid choices"):
        apply_running_stats(Tiny(), "drop")  # type: ignore[arg-type]


def test_a_group_norm_network_has_no_running_statistics_to_release() -> None:
    model = build_model(ModelSpec(encoder="resnet18", image_size=64, norm="group"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert running_stat_names(model) == []
    apply_running_stats(model, "recompute", batches=[torch.rand(2, 1, 64, 64)])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
