"""Training augmentation (albumentations): the same geometric transform on image and mask, intensity on the image only."""

from __future__ import annotations

import albumentations as A
import cv2


def build_augmentation(strength: float = 1.0) -> A.Compose:
    """Flip, small rotation/scale/shift and brightness/contrast/gamma; ``strength`` 0 disables everything."""
    if strength <= 0:
        return A.Compose([])
    return A.Compose(
        [
            A.HorizontalFlip(p=0.5),
            A.Affine(
                rotate=(-10 * strength, 10 * strength),
                scale=(1 - 0.1 * strength, 1 + 0.1 * strength),
                translate_percent=(-0.05 * strength, 0.05 * strength),
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                fill_mask=0,
                p=0.7,
            ),
            A.RandomBrightnessContrast(brightness_limit=0.15 * strength, contrast_limit=0.15 * strength, p=0.5),
            A.RandomGamma(gamma_limit=(int(100 - 20 * strength), int(100 + 20 * strength)), p=0.3),
        ],
        mask_interpolation=cv2.INTER_NEAREST,
    )
