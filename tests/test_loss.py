"""common.loss: the seed's 0.5 Dice + 0.5 cross-entropy on hand-checkable tensors."""

from __future__ import annotations

import math

import pytest
import torch

from common.loss import IGNORE_INDEX, SeedLoss, soft_dice_loss


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


# --- the partial-label loss: pixels marked IGNORE_INDEX ---------------------------------------


def _case() -> tuple[torch.Tensor, torch.Tensor]:
    """2 slices of 4 x 6 pixels, random logits, every class in the left half of each slice."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, 4, 6, generator=gen)
    target = torch.randint(0, 4, (2, 4, 6), generator=gen)
    target[:, 0, :4] = torch.tensor([0, 1, 2, 3])
    return logits, target


@pytest.mark.parametrize("weights", [(0.5, 0.5), (1.0, 0.0), (0.0, 1.0)])
def test_ignored_pixels_get_exactly_zero_gradient_and_the_rest_is_the_loss_of_the_kept_part(
    weights: tuple[float, float],
) -> None:
    """Ignoring the right two columns = the plain loss of the left four columns, gradient and all."""
    logits, target = _case()
    masked = target.clone()
    masked[..., 4:] = IGNORE_INDEX
    loss = SeedLoss(*weights)
    full = logits.clone().requires_grad_()
    value = loss(full, masked)
    value.backward()
    left = logits[..., :4].clone().requires_grad_()
    expected = loss(left, target[..., :4])
    expected.backward()
    assert full.grad is not None and left.grad is not None
    assert float(value.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    assert torch.equal(full.grad[..., 4:], torch.zeros_like(full.grad[..., 4:]))  # exactly zero
    torch.testing.assert_close(full.grad[..., :4], left.grad)
    # ... and the ignored pixels really would have mattered to the plain loss
    plain = logits.clone().requires_grad_()
    loss(plain, target).backward()
    assert plain.grad is not None and float(plain.grad[..., 4:].abs().sum()) > 0


def test_scattered_ignored_pixels_have_zero_gradient_and_their_logits_do_not_change_the_loss() -> None:
    logits, target = _case()
    ignore = torch.zeros_like(target, dtype=torch.bool)
    ignore[0, 1, 1] = ignore[1, 3, 5] = ignore[1, 2, 0] = True
    masked = target.where(~ignore, IGNORE_INDEX)
    x = logits.clone().requires_grad_()
    value = SeedLoss()(x, masked)
    value.backward()
    assert x.grad is not None
    assert torch.equal(x.grad.permute(0, 2, 3, 1)[ignore], torch.zeros(3, 4))
    changed = logits.clone()
    changed.permute(0, 2, 3, 1)[ignore] = 40.0 * torch.randn(3, 4)
    assert float(SeedLoss()(changed, masked)) == pytest.approx(float(value.detach()), rel=1e-6)


def test_an_empty_ignore_mask_gives_the_plain_loss_bit_for_bit() -> None:
    logits, target = _case()
    x = logits.clone().requires_grad_()
    value = SeedLoss()(x, target)
    value.backward()
    # the seed's formula written out: CE mean over every pixel + Dice over present classes
    probs = logits.softmax(1)[:, 1:]
    onehot = torch.nn.functional.one_hot(target, 4).permute(0, 3, 1, 2)[:, 1:].float()
    inter, denom = (probs * onehot).sum((0, 2, 3)), (probs + onehot).sum((0, 2, 3))
    dice = 1 - (2 * inter + 1) / (denom + 1)
    seed = 0.5 * torch.nn.functional.cross_entropy(logits, target) + 0.5 * dice.mean()
    assert float(value.detach()) == pytest.approx(float(seed), rel=1e-6)
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


def test_a_batch_with_every_pixel_ignored_has_zero_loss_and_zero_gradient() -> None:
    logits, _ = _case()
    x = logits.clone().requires_grad_()
    value = SeedLoss()(x, torch.full((2, 4, 6), IGNORE_INDEX))
    value.backward()
    assert float(value.detach()) == 0.0 and x.grad is not None and not bool(x.grad.any())
