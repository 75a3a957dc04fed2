"""Grad-CAM for the classification head, computed in closed form from the class activation map.

For GAP -> linear (``class_pool`` "mean"), Grad-CAM's channel weights are ``fc.weight[c] / (h*w)``, so Grad-CAM equals
the bias-free CAM up to a positive constant: no hooks and no backward pass are needed. With ``class_pool`` "mask" the
pooling weights vary over the grid, so the map returned here (the served one, the exact decomposition of the logit)
is HiResCAM at the fused layer, not Grad-CAM's channel-averaged map.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .heatmap import cam_heatmap
from .model import MultiTaskModel


@torch.no_grad()
def grad_cam(
    model: MultiTaskModel,
    x: torch.Tensor,
    target_class: int | Sequence[int] | torch.Tensor | None = None,
    size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Heatmaps (B, H, W) in [0, 1]: relu(CAM of the target class), bilinear to ``size`` (default: the input's
    H, W), min-max normalised per image. A map with no positive evidence is all zeros.

    ``target_class``: None (each image's predicted class), one class for all images, or one per image.
    Call with the model in eval mode, as for any explainer.
    """
    features = model.forward_features(x)
    cams = model.class_activation_maps(features)
    if target_class is None:
        target = model.classify(features).argmax(dim=1)
    else:
        target = torch.as_tensor(target_class, device=cams.device).long().expand(cams.shape[0])
    cam = cams[torch.arange(cams.shape[0], device=cams.device), target].float().cpu().numpy()
    height, width = size or tuple(x.shape[-2:])
    # The one CAM -> heatmap rule (train/heatmap.py), shared with the evaluation report and the API.
    return torch.from_numpy(np.stack([cam_heatmap(c, (height, width)) for c in cam])).to(cams.device)
