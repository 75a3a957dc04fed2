"""Results as JSON-ready dicts: the HTTP body and the SDK's view of it (PNGs as base64).

The gRPC messages carry the same fields with PNGs as bytes (see clients/ for the proto).
"""

from __future__ import annotations

import base64

from .postprocess import AnalysisResult


def b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def analysis_to_dict(result: AnalysisResult, model: dict | None = None, *, images: bool = True) -> dict:
    out = {
        "label": result.label,
        "probabilities": result.probabilities,
        "refer": result.refer,
        "refer_reason": list(result.refer_reason),
        "tumor_area_px": result.tumor_area_px,
        "tumor_area_mm2": result.tumor_area_mm2,
        "mask_label_disagree": result.mask_label_disagree,
        "image_height": result.original_shape[0],
        "image_width": result.original_shape[1],
    }
    if images:
        out["mask_png"] = b64(result.mask_png)
        out["heatmap_png"] = b64(result.heatmap_png)
        out["overlay_png"] = b64(result.overlay_png)
    if model is not None:
        out["model"] = {"name": model.get("name"), "version": model.get("version")}
    return out


def explanation_to_dict(explanation, model: dict | None = None) -> dict:
    out = {
        "method": explanation.method,
        "target": explanation.target,
        "label": explanation.label,
        "probabilities": explanation.probabilities,
        "num_samples": explanation.num_samples,
        "seconds": round(float(explanation.seconds), 4),
        "cached": explanation.cached,
        "image_height": explanation.original_shape[0],
        "image_width": explanation.original_shape[1],
        "heatmap_png": b64(explanation.heatmap_png),
        "overlay_png": b64(explanation.overlay_png),
    }
    if model is not None:
        out["model"] = {"name": model.get("name"), "version": model.get("version")}
    return out
