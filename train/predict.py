"""Batched PyTorch inference over preprocessed uint8 slices: probabilities, mask probabilities and class activation maps."""

from __future__ import annotations

import numpy as np
import torch

from .metrics import softmax


@torch.inference_mode()
def predict_arrays(model: torch.nn.Module, images: np.ndarray, *, batch_size: int = 64, device: str | torch.device = "cpu",
                   temperature: float = 1.0, with_cams: bool = False, channels_last: bool = False,
                   with_masks: bool = True, with_features: bool = False) -> dict[str, np.ndarray]:
    """``images`` (N, S, S) uint8 -> logits (N, C), probs (N, C), mask_probs (N, S, S) (None without ``with_masks``)
    and optionally cams (N, C, h, w) and the class head's pooled features (N, K)."""
    was_training = model.training
    model.eval()
    out: dict[str, list[np.ndarray]] = {"logits": [], "mask_probs": [], "cams": [], "features": []}
    try:
        for start in range(0, len(images), batch_size):
            x = torch.from_numpy(np.asarray(images[start : start + batch_size])).to(device)[:, None].float()
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            feats = model.forward_features(x)
            # the decoder once, also when the class head pools with the mask (class_pool "mask")
            mask_logits = model.segment(feats) if with_masks or model.class_needs_mask else None
            out["logits"].append(model.classify(feats, mask_logits).float().cpu().numpy())
            if with_masks:
                out["mask_probs"].append(torch.sigmoid(mask_logits).float()[:, 0].cpu().numpy())
            if with_features:
                out["features"].append(model.class_features(feats, mask_logits).float().cpu().numpy())
            if with_cams:
                out["cams"].append(model.class_activation_maps(feats, mask_logits).float().cpu().numpy())
    finally:
        model.train(was_training)
    logits = np.concatenate(out["logits"]) if out["logits"] else np.zeros((0, 4), np.float32)
    probs = softmax(logits, temperature)
    result = {"logits": logits, "probs": probs, "mask_probs": np.concatenate(out["mask_probs"]) if out["mask_probs"] else None}
    if with_cams:
        result["cams"] = np.concatenate(out["cams"])
    if with_features:
        result["features"] = np.concatenate(out["features"])
    return result
