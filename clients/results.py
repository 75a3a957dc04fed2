"""What the SDK returns: :class:`Analysis`, :class:`Explanation`, :class:`Health`, built from either wire format
(HTTP JSON with base64 PNGs, or the gRPC messages with PNG bytes), so both protocols give equal objects. A mask that
came as COCO RLE (``mask_format="rle"``) reads and saves as one that came as a PNG."""

from __future__ import annotations

import base64
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


def _b64decode(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def _b64encode(data: bytes | None) -> str | None:
    return base64.b64encode(data).decode("ascii") if data else None


def _write(path: str | os.PathLike, data: bytes, what: str) -> Path:
    if not data:
        raise ValueError(f"this result has no {what} (the request did not ask for it)")
    target = Path(path)
    target.write_bytes(data)
    return target


def _png_array(data: bytes, what: str, mode: str | None = None) -> np.ndarray:
    from PIL import Image

    if not data:
        raise ValueError(f"this result has no {what}")
    with Image.open(io.BytesIO(data)) as picture:
        return np.asarray(picture if mode is None else picture.convert(mode))


def _rle_fields(rle) -> dict | None:
    """``{"size": [h, w], "counts": str}`` from the JSON dict or a ``MaskRle`` message; None where absent."""
    if rle is None:
        return None
    if isinstance(rle, dict):
        return {"size": [int(v) for v in rle.get("size") or ()], "counts": rle.get("counts") or ""}
    return {"size": [int(v) for v in rle.size], "counts": rle.counts}


def _model_fields(model) -> dict:
    """(name, version) of the answering model from a JSON dict or a ModelRef message; None where absent."""
    if model is None:
        return {"model_name": None, "model_version": None}
    get = model.get if isinstance(model, dict) else (lambda key: getattr(model, key, ""))
    return {"model_name": get("name") or None, "model_version": get("version") or None}


@dataclass(frozen=True)
class Analysis:
    """One slice's answer. Every PNG, area and size is in the geometry of the image that was sent."""

    label: str
    probabilities: dict[str, float]
    refer: bool
    refer_reason: str | None  # the reasons joined with "; " (see refer_reasons); None when refer is False
    tumor_area_px: int
    tumor_area_mm2: float | None  # set only when the pixel spacing is known (DICOM PixelSpacing)
    mask_png: bytes = field(repr=False)  # greyscale PNG: 255 tumour, 0 background; b"" with mask_format="rle"
    heatmap_png: bytes = field(repr=False)  # RGB PNG: Grad-CAM of `label`; b"" unless the call asked heatmap=True
    overlay_png: bytes | None = field(repr=False)  # RGB PNG, only when the call asked for overlay=True
    model_name: str | None
    model_version: str | None
    refer_reasons: tuple[str, ...] = ()
    mask_label_disagree: bool = False  # label no_tumor with a non-empty mask, or a tumour label with an empty mask
    image_height: int = 0
    image_width: int = 0
    # COCO RLE {"size": [height, width], "counts": str} when the call asked mask_format="rle" (mask_png is b"" then).
    mask_rle: dict | None = field(default=None, repr=False)
    # The DICOM results as Part 10 bytes {"seg", "sr", "overlay"} when the call asked dicom=True (a DICOM input).
    dicom: dict | None = field(default=None, repr=False)

    @classmethod
    def from_json(cls, body: dict, model: dict | None = None) -> Analysis:
        """From the HTTP gateway's /analyze body (or one /analyze_batch result with the batch's ``model``)."""
        reasons = tuple(body.get("refer_reason") or ())
        return cls(
            label=body["label"],
            probabilities={k: float(v) for k, v in body["probabilities"].items()},
            refer=bool(body["refer"]),
            refer_reason="; ".join(reasons) or None,
            tumor_area_px=int(body["tumor_area_px"]),
            tumor_area_mm2=None if body.get("tumor_area_mm2") is None else float(body["tumor_area_mm2"]),
            mask_png=_b64decode(body.get("mask_png")),
            heatmap_png=_b64decode(body.get("heatmap_png")),
            overlay_png=_b64decode(body.get("overlay_png")) or None,
            **_model_fields(body.get("model", model)),
            refer_reasons=reasons,
            mask_label_disagree=bool(body.get("mask_label_disagree", False)),
            image_height=int(body.get("image_height", 0)),
            image_width=int(body.get("image_width", 0)),
            mask_rle=_rle_fields(body.get("mask_rle")),
            dicom={k: _b64decode(v) for k, v in body["dicom"].items()} if body.get("dicom") else None,
        )

    @classmethod
    def from_message(cls, message) -> Analysis:
        """From a gRPC ``braintumor.v1.AnalyzeResponse``."""
        reasons = tuple(message.refer_reason)
        return cls(
            label=message.label,
            probabilities=dict(message.probabilities),
            refer=message.refer,
            refer_reason="; ".join(reasons) or None,
            tumor_area_px=int(message.tumor_area_px),
            tumor_area_mm2=message.tumor_area_mm2 if message.HasField("tumor_area_mm2") else None,
            mask_png=message.mask_png,
            heatmap_png=message.heatmap_png,
            overlay_png=message.overlay_png or None,
            **_model_fields(message.model if message.HasField("model") else None),
            refer_reasons=reasons,
            mask_label_disagree=message.mask_label_disagree,
            image_height=message.image_height,
            image_width=message.image_width,
            mask_rle=_rle_fields(message.mask_rle) if message.HasField("mask_rle") else None,
            dicom=({"seg": message.dicom.seg, "sr": message.dicom.sr, "overlay": message.dicom.overlay}
                   if message.HasField("dicom") else None),
        )

    def dicom_datasets(self) -> dict:
        """The DICOM results as pydicom datasets {"seg", "sr", "overlay"} (the call must have asked ``dicom=True``)."""
        import pydicom

        if not self.dicom:
            raise ValueError("this result has no DICOM objects: call analyze(..., dicom=True) with a DICOM slice")
        return {key: pydicom.dcmread(io.BytesIO(data)) for key, data in self.dicom.items()}

    def mask_png_bytes(self) -> bytes:
        """The mask as a greyscale PNG (255 tumour, 0 background): the server's, or made here from the RLE with the
        server's own encoder settings (:func:`~.masks.mask_png`), so the file is the same whichever format came."""
        if self.mask_png:
            return self.mask_png
        from .masks import mask_png

        return mask_png(self.mask_array())

    def save_mask(self, path: str | os.PathLike) -> Path:
        """Write the mask as a greyscale PNG, whichever format it came in."""
        return _write(path, self.mask_png_bytes(), "mask PNG")

    def save_heatmap(self, path: str | os.PathLike) -> Path:
        if not self.heatmap_png:
            raise ValueError("this result has no heatmap: call analyze(..., heatmap=True) to get one")
        return _write(path, self.heatmap_png, "heatmap PNG")

    def save_overlay(self, path: str | os.PathLike) -> Path:
        if not self.overlay_png:
            raise ValueError("this result has no overlay: call analyze(..., overlay=True) to get one")
        return _write(path, self.overlay_png, "overlay PNG")

    def mask_array(self) -> np.ndarray:
        """The tumour mask as a bool array of the sent image's (height, width), from the PNG or the RLE."""
        if not self.mask_png and self.mask_rle is not None:
            from .masks import decode_rle

            return decode_rle(self.mask_rle)
        # As grey levels, so a 1-bit PNG (whose array is bool) reads right too: a cheaper mask encoding would not
        # silently empty this array (loadtest/bench_mask_png.py measured it).
        return _png_array(self.mask_png, "mask PNG", "L") > 127

    def to_dict(self, images: bool = False) -> dict:
        """JSON-safe fields (one CSV/JSONL row); ``images=True`` adds the PNGs base64-encoded and the mask's RLE
        (``mask_rle``, as it came; None when the mask came as a PNG)."""
        out = {
            "label": self.label,
            "probabilities": dict(self.probabilities),
            "refer": self.refer,
            "refer_reason": self.refer_reason,
            "tumor_area_px": self.tumor_area_px,
            "tumor_area_mm2": self.tumor_area_mm2,
            "mask_label_disagree": self.mask_label_disagree,
            "image_height": self.image_height,
            "image_width": self.image_width,
            "model_name": self.model_name,
            "model_version": self.model_version,
        }
        if images:
            out.update(mask_png=_b64encode(self.mask_png), heatmap_png=_b64encode(self.heatmap_png),
                       overlay_png=_b64encode(self.overlay_png),
                       mask_rle=None if self.mask_rle is None else dict(self.mask_rle))
        return out


@dataclass(frozen=True)
class Explanation:
    """An explanation heatmap for ``target`` made by ``method`` (gradcam, lime or shap)."""

    method: str
    target: str  # the class explained
    heatmap_png: bytes = field(repr=False)  # RGB PNG, jet colours (red = most evidence for target)
    overlay_png: bytes | None = field(default=None, repr=False)  # the slice with the heatmap blended in
    label: str = ""  # the predicted class
    probabilities: dict[str, float] = field(default_factory=dict)
    num_samples: int = 0  # model evaluations made (LIME samples, SHAP evaluations); 0 for Grad-CAM
    seconds: float = 0.0  # time the explanation took (the first computation's when cached)
    cached: bool = False
    image_height: int = 0
    image_width: int = 0
    model_name: str | None = None
    model_version: str | None = None

    @classmethod
    def from_json(cls, body: dict) -> Explanation:
        return cls(
            method=body["method"], target=body["target"],
            heatmap_png=_b64decode(body.get("heatmap_png")), overlay_png=_b64decode(body.get("overlay_png")) or None,
            label=body.get("label") or "",
            probabilities={k: float(v) for k, v in (body.get("probabilities") or {}).items()},
            num_samples=int(body.get("num_samples") or 0), seconds=float(body.get("seconds") or 0.0),
            cached=bool(body.get("cached")), image_height=int(body.get("image_height", 0)),
            image_width=int(body.get("image_width", 0)), **_model_fields(body.get("model")),
        )

    @classmethod
    def from_message(cls, message) -> Explanation:
        return cls(
            method=message.method, target=message.target, heatmap_png=message.heatmap_png,
            overlay_png=message.overlay_png or None, label=message.label,
            probabilities=dict(message.probabilities), num_samples=message.num_samples, seconds=message.seconds,
            cached=message.cached, image_height=message.image_height, image_width=message.image_width,
            **_model_fields(message.model if message.HasField("model") else None),
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write the heatmap PNG."""
        return _write(path, self.heatmap_png, "heatmap PNG")

    def save_overlay(self, path: str | os.PathLike) -> Path:
        return _write(path, self.overlay_png or b"", "overlay PNG")

    def heatmap_array(self) -> np.ndarray:
        """The heatmap as an (H, W, 3) uint8 RGB array."""
        return _png_array(self.heatmap_png, "heatmap PNG")

    def to_dict(self, images: bool = False) -> dict:
        out = {"method": self.method, "target": self.target, "label": self.label,
               "probabilities": dict(self.probabilities), "num_samples": self.num_samples, "seconds": self.seconds,
               "cached": self.cached, "image_height": self.image_height, "image_width": self.image_width,
               "model_name": self.model_name, "model_version": self.model_version}
        if images:
            out.update(heatmap_png=_b64encode(self.heatmap_png), overlay_png=_b64encode(self.overlay_png))
        return out


@dataclass(frozen=True)
class Health:
    """``live``: the server answers; ``ready``: its model is loaded and Triton is up; ``model``: the model's info
    (name, version, classes, ...) when ready, else None."""

    live: bool
    ready: bool
    model: dict | None = None
