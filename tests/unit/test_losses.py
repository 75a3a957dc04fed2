"""Loss values on toy inputs against hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch

from braintumor.train.losses import classification_loss, dice_loss, segmentation_loss

BIG = 30.0  # sigmoid(30) = 1 - 9.4e-14: a hard prediction


def test_cross_entropy_uniform_logits_is_log_num_classes() -> None:
    loss = classification_loss(torch.zeros(2, 4), torch.tensor([0, 3]))
    assert loss.item() == pytest.approx(math.log(4))


def test_cross_entropy_class_weights_and_label_smoothing() -> None:
    logits = torch.tensor([[math.log(2.0), 0.0, 0.0, 0.0]] * 2)  # p = [2/5, 1/5, 1/5, 1/5]
    target = torch.tensor([0, 1])
    weights = torch.tensor([1.0, 3.0, 1.0, 1.0])
    expected = (1 * math.log(2.5) + 3 * math.log(5)) / 4
    assert classification_loss(logits, target, class_weights=weights).item() == pytest.approx(expected, rel=1e-6)
    eps = 0.1
    nll_all = math.log(2.5) + 3 * math.log(5)  # sum over classes of -log p
    smoothed = (1 - eps) * math.log(2.5) + eps / 4 * nll_all
    loss = classification_loss(logits[:1], target[:1], label_smoothing=eps)
    assert loss.item() == pytest.approx(smoothed, rel=1e-6)


def test_dice_half_overlap_by_hand() -> None:
    # p = 0.5 everywhere on 2x2, one target pixel: (2*0.5 + 1) / (2 + 1 + 1) = 0.5
    logits = torch.zeros(1, 1, 2, 2)
    target = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    assert dice_loss(logits, target).item() == pytest.approx(0.5)


def test_dice_perfect_disjoint_and_empty() -> None:
    target = torch.zeros(1, 1, 8, 8)
    target[..., :4, :] = 1  # 32 pixels
    perfect = (target * 2 - 1) * BIG
    assert dice_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-6)
    disjoint = -perfect  # predicts the other 32 pixels
    assert dice_loss(disjoint, target).item() == pytest.approx(1 - 1 / 65, abs=1e-6)
    assert dice_loss(disjoint, target, eps=1e-7).item() == pytest.approx(1.0, abs=1e-6)
    empty = torch.zeros_like(target)
    assert dice_loss(torch.full_like(target, -BIG), empty).item() == pytest.approx(0.0, abs=1e-6)
    assert dice_loss(torch.full_like(target, BIG), empty).item() == pytest.approx(64 / 65, abs=1e-6)


def test_dice_is_per_image_then_batch_mean() -> None:
    target = torch.zeros(2, 1, 2, 2)
    target[0, 0, 0, 0] = 1
    logits = torch.zeros(2, 1, 2, 2)
    logits[1] = -BIG  # image 1: empty target, empty prediction -> 0
    assert dice_loss(logits, target).item() == pytest.approx((0.5 + 0.0) / 2)
    assert dice_loss(logits, target[:, 0]).item() == pytest.approx(0.25)  # (B, H, W) targets accepted


def test_segmentation_loss_combines_manual_bce_and_dice() -> None:
    logits = torch.tensor([[[[2.0, -1.0], [0.0, 3.0]]]])
    target = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    p = [sig(2.0), sig(-1.0), sig(0.0), sig(3.0)]
    t = [1, 0, 1, 0]
    bce = -sum(ti * math.log(pi) + (1 - ti) * math.log(1 - pi) for pi, ti in zip(p, t)) / 4
    dice = 1 - (2 * (p[0] + p[2]) + 1) / (sum(p) + 2 + 1)
    assert segmentation_loss(logits, target).item() == pytest.approx(0.5 * bce + 0.5 * dice, rel=1e-6)
    loss = segmentation_loss(logits, target, bce_weight=1.0, dice_weight=0.0)
    assert loss.item() == pytest.approx(bce, rel=1e-6)


def test_mismatched_mask_shape_raises() -> None:
    with pytest.raises(ValueError, match="does not match"):
        segmentation_loss(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 8, 8))


def test_cam_loss_is_the_share_of_positive_energy_outside_the_dilated_mask() -> None:
    from braintumor.train.losses import cam_outside_loss

    masks = torch.zeros(2, 1, 32, 32, dtype=torch.uint8)
    masks[:, :, 0:4, 0:4] = 1  # the tumour touches the CAM cell (0, 0) of the 8x8 grid (4-px cells)
    cams = torch.zeros(2, 4, 8, 8)
    cams[:, 1, 0:2, 0:2] = 3.0  # inside: cell (0, 0) and its one-cell dilation
    cams[:, 1, 5:, 5:] = -2.0  # negative evidence does not count
    labels = torch.tensor([1, 1])
    assert cam_outside_loss(cams, labels, masks).item() == 0.0
    cams[1, 1, 6, 6] = 4.0  # image 1: 4 of its 16 units outside -> 0.25; the batch mean is 0.125
    torch.testing.assert_close(cam_outside_loss(cams, labels, masks), torch.tensor(0.125), atol=1e-6, rtol=0)
    cams[:, 2, 7, 7] = 9.0  # another class's CAM is not the true class's
    torch.testing.assert_close(cam_outside_loss(cams, labels, masks), torch.tensor(0.125), atol=1e-6, rtol=0)
    masks[1] = 0  # only tumour images count: image 1 has no tumour now
    assert cam_outside_loss(cams, labels, masks).item() == 0.0
    assert cam_outside_loss(cams, labels, torch.zeros(2, 32, 32)).item() == 0.0  # no tumour image at all
