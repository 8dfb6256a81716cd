"""BatchNorm running statistics in the weights a site sends back: which ones, by the site's rule.

A BatchNorm layer's ``running_mean`` / ``running_var`` are not learned weights: they are
averages of the activations of the images the site trained on. PyTorch keeps them as an
exponential moving average (momentum 0.1), so the last batches of the last epoch weigh most,
and the coordinator chooses the batch size and the order (``train.batch-size``,
``train.seed``): with batches of one image the statistics lean on the last image or two. The
site's policy (``[training] batchnorm-stats``, ``client.policy``) picks one rule:

- ``recompute`` (default): after training, the statistics are recomputed in one pass over
  every training slice in a fixed order, as ``torch.optim.swa_utils.update_bn`` does but
  weighted by slices (each batch's momentum is its share of the slices seen so far): the
  running mean is the exact mean over every training slice, the variance the slice-weighted
  mean of the batch variances. An aggregate over the whole training split, like every other
  number a site releases, whatever the batch order;
- ``received``: the statistics the site received, copied back unchanged: none of the site's
  images are in them (but the global model's statistics then never learn from this site);
- ``local``: as training left them (PyTorch's moving average; sarcofed before this option).

A network without BatchNorm (``model.norm = "group"``) has no running statistics; every rule
leaves it as it is. Called by ``common.training.train_local`` before validation, so the
validation metrics describe the weights that leave. Imports no torch at module level: the
site's policy names the rules.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Final, Literal

if TYPE_CHECKING:
    import torch

RunningStats = Literal["recompute", "received", "local"]
RUNNING_STATS: Final[tuple[str, ...]] = ("recompute", "received", "local")


def running_stat_names(model: torch.nn.Module) -> list[str]:
    """State-dict names of every BatchNorm buffer (running mean, var, batch counter) of ``model``."""
    import torch

    names = []
    for prefix, module in model.named_modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            names += [f"{prefix}.{name}" if prefix else name for name, _ in module.named_buffers()]
    return names


def apply_running_stats(
    model: torch.nn.Module,
    rule: RunningStats,
    *,
    received: Mapping[str, torch.Tensor] | None = None,
    batches: Iterable[torch.Tensor] = (),
) -> None:
    """Set ``model``'s BatchNorm statistics by ``rule`` (in place; the model's mode is kept).

    ``received``: the state the site was sent (rule ``received``); ``batches``: model-input
    batches of every training slice in a fixed order (rule ``recompute``).
    """
    import torch

    names = running_stat_names(model)
    if rule == "local" or not names:
        return
    if rule == "received":
        if received is None:
            raise ValueError("batchnorm-stats = 'received' needs the state the site received")
        missing = [n for n in names if n not in received]
        if missing:
            raise ValueError(f"the received state has no BatchNorm statistics {missing[:3]}")
        state = model.state_dict()
        with torch.no_grad():
            for name in names:
                state[name].copy_(received[name].to(state[name].dtype))
        return
    if rule == "recompute":
        _recompute(model, batches)
        return
    raise ValueError(f"unknown batchnorm-stats rule {rule!r}; valid choices are: {', '.join(RUNNING_STATS)}")


def _recompute(model: torch.nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """One pass in training mode: momentum ``b / seen`` gives every slice the same weight."""
    import torch

    layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.reset_running_stats()
    was_training = model.training
    model.train()
    seen = 0
    try:
        with torch.no_grad():
            for images in batches:
                seen += len(images)
                for layer in layers:
                    layer.momentum = len(images) / seen
                model(images)
    finally:
        for layer, momentum in zip(layers, momenta, strict=True):
            layer.momentum = momentum
        model.train(was_training)


__all__ = ["RUNNING_STATS", "RunningStats", "apply_running_stats", "running_stat_names"]
