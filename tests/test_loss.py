"""common.loss: the seed's 0.5 Dice + 0.5 cross-entropy on hand-checkable tensors."""

from __future__ import annotations

import math

import pytest
import torch

from common.loss import SeedLoss, soft_dice_loss


def _perfect_logits(target: torch.Tensor, scale: float = 50.0) -> torch.Tensor:
    return torch.nn.functional.one_hot(target, 4).permute(0, 3, 1, 2).float() * scale


TARGET = torch.tensor([[[0, 1], [2, 3]]])  # 1 x 2 x 2: every class once


def test_perfect_prediction_has_zero_dice_and_ce() -> None:
    logits = _perfect_logits(TARGET)
    assert float(soft_dice_loss(logits, TARGET)) == pytest.approx(0.0, abs=1e-6)
    assert float(SeedLoss()(logits, TARGET)) == pytest.approx(0.0, abs=1e-6)


def test_uniform_logits_give_known_values() -> None:
    logits = torch.zeros(1, 4, 2, 2)
    # CE of a uniform 4-way softmax is ln 4 on every pixel.
    assert float(SeedLoss(dice_weight=0.0, ce_weight=1.0)(logits, TARGET)) == pytest.approx(math.log(4))
    # Each foreground class: p = 0.25 on 4 px, one true px: dice = (2*0.25 + 1) / (1 + 1 + 1) = 0.5.
    assert float(soft_dice_loss(logits, TARGET, smooth=1.0)) == pytest.approx(0.5)
    # smooth 0: dice = 0.5 / 2 = 0.25 -> loss 0.75
    assert float(soft_dice_loss(logits, TARGET, smooth=0.0)) == pytest.approx(0.75)
    assert float(SeedLoss()(logits, TARGET)) == pytest.approx(0.5 * math.log(4) + 0.5 * 0.5)


def test_absent_classes_are_left_out_of_the_dice_mean() -> None:
    target = torch.tensor([[[0, 1], [0, 1]]])  # only muscle present
    logits = _perfect_logits(target)
    logits[:, 3] = logits[:, 0]  # background pixels half visceral fat: absent class, not in Dice
    assert float(soft_dice_loss(logits, target, smooth=0.0)) == pytest.approx(0.0, abs=1e-6)
    background_only = torch.zeros(1, 2, 2, dtype=torch.long)
    assert float(soft_dice_loss(torch.randn(1, 4, 2, 2), background_only)) == 0.0


def test_wrong_prediction_scores_worse_and_gradients_flow() -> None:
    logits = _perfect_logits(TARGET, scale=2.0).requires_grad_()
    wrong = _perfect_logits(torch.tensor([[[3, 2], [1, 0]]]), scale=2.0)
    loss = SeedLoss()
    good = loss(logits, TARGET)
    assert float(good.detach()) < float(loss(wrong, TARGET))
    good.backward()
    assert logits.grad is not None and float(logits.grad.abs().sum()) > 0


def test_shape_and_weight_errors() -> None:
    with pytest.raises(ValueError, match=r"N x H x W"):
        soft_dice_loss(torch.zeros(1, 4, 2, 2), torch.zeros(1, 3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="dice_weight=-1"):
        SeedLoss(dice_weight=-1)
