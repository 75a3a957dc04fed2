"""Training losses: cross-entropy for the class head, BCE + soft Dice for the mask head, the GAIN-style CAM loss
(float32 math)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def classification_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    label_smoothing: float = 0.0,
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy; with ``class_weights`` the mean is weighted (sum w_i * l_i / sum w_i), as in PyTorch."""
    weight = None if class_weights is None else class_weights.to(logits.device, torch.float32)
    return F.cross_entropy(logits.float(), target, weight=weight, label_smoothing=label_smoothing)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice loss per image, mean over the batch: ``1 - (2*sum(p*t) + eps) / (sum(p) + sum(t) + eps)``.

    ``p = sigmoid(logits)``. An empty target with an empty prediction gives 0; an empty target with a predicted
    area of A pixels gives ``A / (A + eps)``, so eps=1 keeps a useful gradient on tumour-free slices.
    """
    target = _match(target, logits)
    probs = torch.sigmoid(logits.float()).flatten(1)
    target = target.flatten(1)
    intersection = (probs * target).sum(dim=1)
    dice = (2.0 * intersection + eps) / (probs.sum(dim=1) + target.sum(dim=1) + eps)
    return (1.0 - dice).mean()


def segmentation_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    bce_weight: float = 0.5,
    dice_weight: float = 0.5,
) -> torch.Tensor:
    """``bce_weight * BCE-with-logits (pixel mean) + dice_weight * dice_loss``; target in {0, 1}."""
    target = _match(target, logits)
    bce = F.binary_cross_entropy_with_logits(logits.float(), target)
    return bce_weight * bce + dice_weight * dice_loss(logits, target)


def cam_outside_loss(cams: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Mean over tumour images (non-empty expert mask) of the true class's positive CAM energy outside the mask, as a
    share of its positive energy; 0 for a batch without tumour images.

    ``cams`` (B, C, h, w) bias-free CAMs, ``labels`` (B,), ``masks`` (B, [1,] H, W) expert masks (non-zero = tumour) with
    H, W multiples of h, w. A CAM cell counts as inside when any mask pixel falls in it or in a neighbouring cell (the
    mask at the CAM grid, dilated by one cell): the grid is coarse, a tumour's edge cell is not evidence elsewhere.
    """
    if masks.dim() == 3:
        masks = masks.unsqueeze(1)
    masks = (masks > 0).float()
    inside = F.adaptive_max_pool2d(masks, cams.shape[-2:])
    inside = F.max_pool2d(inside, kernel_size=3, stride=1, padding=1)[:, 0]
    energy = cams[torch.arange(len(cams), device=cams.device), labels].float().relu()
    outside = (energy * (1.0 - inside)).sum(dim=(1, 2)) / (energy.sum(dim=(1, 2)) + eps)
    tumour = masks.flatten(1).amax(dim=1) > 0
    return outside[tumour].mean() if tumour.any() else outside.sum() * 0.0


def _match(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Float target shaped like the logits; (B, H, W) targets gain the channel axis of (B, 1, H, W) logits."""
    if target.dim() == logits.dim() - 1:
        target = target.unsqueeze(1)
    if target.shape != logits.shape:
        raise ValueError(f"mask target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}")
    return target.float()
