"""The seed paper's loss: ``dice_weight`` x soft Dice loss + ``ce_weight`` x cross-entropy.

The seed (Table 1) uses ``Dice Loss*(0.5) + Cross Entropy Loss*(0.5)``: Dice counters the
class imbalance (background dominates an L3 slice), cross-entropy drives pixel accuracy.

Soft Dice here is multi-class over the *foreground* classes 1..C-1 (muscle, subcutaneous
fat, visceral fat), pooled over the whole batch and all pixels:

    dice_c = (2 * sum(p_c * y_c) + smooth) / (sum(p_c) + sum(y_c) + smooth)
    dice loss = mean over classes c present in the batch's target of (1 - dice_c)

Empty-class handling: a class absent from every target in the batch has no overlap to
measure and is left out of the mean (its false positives are still penalised by the
cross-entropy term). When no foreground class is present at all, the Dice term is 0 and
only cross-entropy remains.

Ignored pixels (the partial-label loss of convention-aware training, docs/CONVENTIONS.md):
a target pixel equal to :data:`IGNORE_INDEX` is left out of both terms. Cross-entropy is the
mean over the kept pixels, and the Dice sums run over the kept pixels only, so an ignored
pixel gets exactly zero gradient and the loss of the other pixels is what it would be on
an image made of them alone. Without an ignored pixel the loss is the seed's, unchanged.
When every pixel of a batch is ignored the loss is 0 (with a graph, so a step is a no-op).
"""

from __future__ import annotations

from typing import Final

import torch
import torch.nn.functional as F
from torch import nn

#: A target value that marks a pixel whose label says nothing under the study protocol.
IGNORE_INDEX: Final = 255


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, *, smooth: float = 1.0) -> torch.Tensor:
    """Soft multi-class Dice loss over foreground classes (see module docstring).

    ``logits``: ``N x C x H x W``; ``target``: ``N x H x W`` integer class indices, or
    :data:`IGNORE_INDEX` for a pixel left out of the sums.
    """
    if logits.ndim != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"expected logits N x C x H x W and target N x H x W, got {tuple(logits.shape)} "
            f"and {tuple(target.shape)}"
        )
    classes = logits.shape[1]
    target = target.long()
    keep = (target != IGNORE_INDEX).unsqueeze(1)
    probs = logits.float().softmax(dim=1)[:, 1:]
    onehot = F.one_hot(target.where(keep[:, 0], 0), classes).permute(0, 3, 1, 2)[:, 1:].to(probs.dtype)
    if not bool(keep.all()):
        probs = probs * keep  # an ignored pixel adds nothing to any sum: zero gradient
        onehot = onehot * keep
    dims = (0, 2, 3)
    intersection = (probs * onehot).sum(dims)
    denominator = probs.sum(dims) + onehot.sum(dims)
    dice = (2.0 * intersection + smooth) / (denominator + smooth)
    present = onehot.sum(dims) > 0
    if not bool(present.any()):
        return probs.sum() * 0.0  # keeps the graph; no foreground to measure
    return (1.0 - dice)[present].mean()


class SeedLoss(nn.Module):
    """``dice_weight * soft_dice_loss + ce_weight * cross_entropy`` (seed: 0.5 / 0.5)."""

    def __init__(self, dice_weight: float = 0.5, ce_weight: float = 0.5, *, smooth: float = 1.0) -> None:
        super().__init__()
        if dice_weight < 0 or ce_weight < 0 or dice_weight + ce_weight <= 0:
            raise ValueError(
                "loss weights must be >= 0 and not both 0, "
                f"got dice_weight={dice_weight}, ce_weight={ce_weight}"
            )
        self.dice_weight = float(dice_weight)
        self.ce_weight = float(ce_weight)
        self.smooth = float(smooth)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.long()
        if not bool((target != IGNORE_INDEX).any()):
            return logits.float().sum() * 0.0  # nothing to learn from; keeps the graph
        loss = self.ce_weight * F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX)
        if self.dice_weight:
            loss = loss + self.dice_weight * soft_dice_loss(logits, target, smooth=self.smooth)
        return loss
