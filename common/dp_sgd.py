"""DP-SGD for a site's local training, with Opacus: a site option (policy.toml ``[dp-sgd]``).

Each step draws a Poisson batch (every training slice in with probability ``q = 1 / steps``,
``steps = ceil(n / train.batch-size)`` per epoch), computes one gradient per slice, clips each
to ``max_grad_norm``, sums them and adds Gaussian noise of standard deviation
``noise_multiplier * max_grad_norm`` (Opacus's ``DPOptimizer``). Opacus's RDP accountant gives
the epsilon spent for ``delta``; :func:`planned_epsilon` gives it before training, from the
same accountant. ``common.training.train_local`` calls :func:`train_private` when the site
asks for DP-SGD.

What the smp U-Net needs, and why:

- **No BatchNorm.** BatchNorm mixes the slices of a batch (and keeps running statistics of
  them), so a per-slice gradient does not exist; Opacus refuses it. The study's model must be
  built with ``model.norm = "group"`` (``common.model.to_group_norm``), at every site alike.
- **Per-slice gradients by PyTorch's ExpandedWeights** (Opacus ``grad_sample_mode="ew"``).
  Opacus's default hooks fail on the encoder's ResNet blocks: ``out += identity`` changes in
  place the output of a hooked GroupNorm ("Output 0 of BackwardHookFunction is a view and is
  being modified inplace"); ExpandedWeights needs no hooks and supports Conv2d, GroupNorm and
  Linear, all the U-Net has.
- **A per-slice loss.** The seed loss's Dice term is pooled over the batch, which would make
  one slice's gradient depend on the others; DP-SGD minimises the mean over slices of each
  slice's own seed loss (:func:`per_slice_loss`).
- **Randomness the coordinator cannot replay.** Sampling and noise draw from a generator seeded
  by the operating system, never by ``train.seed``: noise that the coordinator could regenerate
  would protect nothing. (Opacus's ``secure_mode`` needs ``torchcsprng``, which is not
  maintained for current PyTorch; docs/PRIVACY.md states what that leaves.)
- **Empty Poisson batches** still take a step of pure noise: the accountant counts every step.
- **FedProx**: the proximal term holds no data, so it is applied as its own step after the
  private one (post-processing costs no privacy), not through the per-slice gradients.
- **What the epsilon covers**: the weights. The loss the private steps compute
  (``PrivateOutcome.epoch_losses``) is exact, outside the epsilon, and for the site's log only;
  :func:`planned_epsilon` and the accounted epsilon are one round's (rounds compose).
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from common.loss import SeedLoss

if TYPE_CHECKING:
    from common.training import TrainConfig

log = logging.getLogger(__name__)

#: Opacus's per-sample gradient engine for this network (see the module docstring).
GRAD_SAMPLE_MODE = "ew"


@dataclass(frozen=True)
class PrivateTraining:
    """The DP-SGD settings of a site (its policy's ``[dp-sgd]`` table)."""

    noise_multiplier: float
    max_grad_norm: float
    delta: float

    def __post_init__(self) -> None:
        if not (self.noise_multiplier > 0 and self.max_grad_norm > 0 and 0 < self.delta < 1):
            raise ValueError(
                "DP-SGD needs noise_multiplier > 0, max_grad_norm > 0 and 0 < delta < 1, got "
                f"{self.noise_multiplier}, {self.max_grad_norm}, {self.delta}"
            )


@dataclass(frozen=True)
class PrivateOutcome:
    """What a private round did: mean loss per epoch, the last epoch's loss sum (both exact, not
    covered by ``epsilon``: the site keeps them), the steps and the privacy spent."""

    epoch_losses: list[float]
    last_epoch_sum: float
    steps: int
    epsilon: float
    delta: float


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    return max(1, math.ceil(n_train / batch_size))


def planned_epsilon(private: PrivateTraining, n_train: int, batch_size: int, epochs: int) -> float:
    """The epsilon (at ``private.delta``) a round of ``epochs`` local epochs will spend."""
    from opacus.accountants import RDPAccountant

    steps = steps_per_epoch(n_train, batch_size)
    accountant = RDPAccountant()
    accountant.history = [(private.noise_multiplier, 1.0 / steps, steps * epochs)]
    return float(accountant.get_epsilon(private.delta))


def model_problems(model: torch.nn.Module) -> list[str]:
    """Why Opacus cannot train ``model`` privately (empty when it can), in Opacus's words."""
    from opacus.validators import ModuleValidator

    return [str(err).split(". ")[0] for err in ModuleValidator.validate(model, strict=False)]


def per_slice_loss(loss_fn: SeedLoss, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of each slice's own loss (the loss of one slice never sees another)."""
    return torch.stack([loss_fn(logits[k : k + 1], labels[k : k + 1]) for k in range(len(labels))]).mean()


def _proximal_step(model: torch.nn.Module, anchor: Mapping[str, torch.Tensor], mu: float, lr: float) -> None:
    """One gradient step on FedProx's ``mu / 2 * ||w - w_global||^2`` alone (no data in it)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.sub_(lr * mu * (param - anchor[name].to(param.dtype)))


def train_private(
    model: torch.nn.Module,
    n_train: int,
    batch: Callable[[Sequence[int]], tuple[torch.Tensor, torch.Tensor]],
    optimiser: torch.optim.Optimizer,
    config: TrainConfig,
    private: PrivateTraining,
    *,
    anchor: Mapping[str, torch.Tensor] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> PrivateOutcome:
    """``config.local_epochs`` epochs of DP-SGD on ``model`` (in place).

    ``batch(indices)`` gives the model input and labels of those training slices (augmented
    as the recipe says); ``optimiser`` is the recipe's optimiser over ``model``'s parameters.
    Raises ValueError naming the layers when the model cannot be trained privately.
    """
    from opacus.accountants import RDPAccountant
    from opacus.grad_sample import GradSampleModuleExpandedWeights
    from opacus.optimizers import DPOptimizer
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    problems = model_problems(model)
    if problems:
        raise ValueError(
            f"DP-SGD cannot train this model: {'; '.join(sorted(set(problems)))} "
            "(a DP-SGD study needs model.norm = 'group')"
        )
    steps = steps_per_epoch(n_train, config.batch_size)
    sample_rate = 1.0 / steps
    # OS entropy, never the study seed: the coordinator must not be able to replay the noise.
    generator = torch.Generator().manual_seed(secrets.randbits(63))
    sampler = UniformWithReplacementSampler(num_samples=n_train, sample_rate=sample_rate, generator=generator)
    private_model = GradSampleModuleExpandedWeights(model, loss_reduction="mean")
    dp_optimiser = DPOptimizer(
        optimiser,
        noise_multiplier=private.noise_multiplier,
        max_grad_norm=private.max_grad_norm,
        expected_batch_size=max(1, int(n_train * sample_rate)),
        loss_reduction="mean",
        generator=generator,
    )
    accountant = RDPAccountant()
    dp_optimiser.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    params = [p for p in model.parameters() if p.requires_grad]
    loss_fn = SeedLoss(dice_weight=config.dice_weight, ce_weight=1.0 - config.dice_weight)
    epoch_losses: list[float] = []
    epoch_sum = 0.0
    model.train()
    for epoch in range(config.local_epochs):
        epoch_sum = 0.0
        for indices in sampler:
            dp_optimiser.zero_grad(set_to_none=True)
            if len(indices) == 0:  # a step of pure noise; it is counted like any other
                for param in params:
                    setattr(param, "grad_sample", torch.zeros((0, *param.shape), dtype=param.dtype))  # noqa: B010
            else:
                images, labels = batch(indices)
                loss = per_slice_loss(loss_fn, private_model(images), labels)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"training loss became {float(loss)} in epoch {epoch + 1}; lower train.lr "
                        f"(now {config.lr})"
                    )
                loss.backward()
                epoch_sum += float(loss.detach()) * len(indices)
            dp_optimiser.step()
            if anchor is not None and config.proximal_mu > 0:
                _proximal_step(model, anchor, config.proximal_mu, config.lr)
            if on_batch is not None:
                on_batch(len(indices))
        epoch_losses.append(epoch_sum / n_train)
        log.info("DP-SGD epoch %d/%d: train loss %.4f", epoch + 1, config.local_epochs, epoch_losses[-1])
    dp_optimiser.zero_grad(set_to_none=True)
    for param in params:  # what Opacus hung on the parameters stays here
        for attr in ("grad_sample", "summed_grad", "_processed"):
            if hasattr(param, attr):
                delattr(param, attr)
    epsilon = float(accountant.get_epsilon(private.delta))
    log.info("DP-SGD: %d steps, epsilon %.3f at delta %g", len(accountant), epsilon, private.delta)
    return PrivateOutcome(
        epoch_losses=epoch_losses,
        last_epoch_sum=epoch_sum,
        steps=steps * config.local_epochs,
        epsilon=epsilon,
        delta=private.delta,
    )


__all__ = [
    "PrivateOutcome",
    "PrivateTraining",
    "model_problems",
    "per_slice_loss",
    "planned_epsilon",
    "steps_per_epoch",
    "train_private",
]
