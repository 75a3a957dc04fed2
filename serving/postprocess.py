"""Model outputs for one image -> the answer a hospital system gets: label, refer, tumour area, the mask (PNG, or COCO
RLE with ``mask_format="rle"``), and the Grad-CAM heatmap and overlay PNGs when asked for (they cost more CPU than the
rest of the answer).

Torch-free (numpy + Pillow). Every map goes back onto the original image through the preprocessing's own
:class:`Geometry`, so areas and overlays are in the pixels the caller sent.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
from PIL import Image

from ..clients.masks import encode_rle, mask_png
from ..export.contract import CAM, CLASS_PROBS, MASK_PROB, OOD_SCORE
from ..train.decode import DecodedImage
from ..train.heatmap import cam_heatmap, heatmap_levels
from ..train.preprocess import Geometry, PreprocessConfig, invert_geometry, mask_to_original
from ..train.refer import ReferRules, decide
from ..train.refer import reasons as refer_reasons
from .request import AnalyzeOptions

MIN_STD = 2.0  # grey levels; below this the image is blank or near-constant
MIN_FOREGROUND = 0.01  # fraction of pixels above the foreground threshold; below this the image is mostly blank
FOREGROUND_THRESHOLD = PreprocessConfig.foreground_threshold
HEATMAP_ALPHA = 0.5  # overlay opacity of the hottest heatmap pixel; cold pixels leave the slice untouched
MASK_COLOUR = (255, 0, 0)


def _jet() -> np.ndarray:
    """256-entry 'jet' colormap (dark blue -> cyan -> yellow -> dark red), the Grad-CAM convention."""
    x = np.linspace(0.0, 1.0, 256)
    rgb = np.stack([np.clip(1.5 - np.abs(4.0 * x - c), 0.0, 1.0) for c in (3.0, 2.0, 1.0)], axis=-1)
    return np.rint(rgb * 255).astype(np.uint8)


JET = _jet()


@dataclass(frozen=True, eq=False)
class AnalysisResult:
    """One image's answer. Arrays and PNGs are in the original image geometry (``original_shape`` = H, W)."""

    label: str
    probabilities: dict[str, float]
    refer: bool
    refer_reason: list[str]  # why a human should read this slice; empty when refer is False
    tumor_area_px: int  # tumour pixels of the mask, in original image pixels
    tumor_area_mm2: float | None  # when the pixel spacing is known (DICOM PixelSpacing)
    # The mask is reported as predicted, even when the classifier says otherwise: True when the label is
    # no_tumor but the mask is not empty, or a tumour label comes with an empty mask.
    mask_label_disagree: bool
    original_shape: tuple[int, int]
    mask_png: bytes | None = field(repr=False)  # L mode, 0 background / 255 tumour; None with mask_format="rle"
    heatmap_png: bytes | None = field(default=None, repr=False)  # RGB, jet Grad-CAM of ``label``; only when asked
    overlay_png: bytes | None = field(default=None, repr=False)  # RGB slice + heatmap + red mask outline
    mask: np.ndarray | None = field(default=None, repr=False)  # (H, W) uint8 0/1
    heatmap: np.ndarray | None = field(default=None, repr=False)  # (H, W) uint8 0..255; None unless asked (or overlay)
    model_name: str = ""  # the model that answered (the pipeline stamps it), so no front door asks Triton again
    model_version: str = ""
    # COCO RLE {"size": [H, W], "counts": str} of the same mask; only with mask_format="rle" (then no PNG is made).
    mask_rle: dict | None = field(default=None, repr=False)
    # The DICOM results (seg, sr, overlay: Part 10 bytes) when asked with ``dicom`` (serving/dicom_answer.py).
    dicom: dict[str, bytes] | None = field(default=None, repr=False)


def postprocess(
    outputs: Mapping[str, np.ndarray],
    geometry: Geometry,
    decoded: DecodedImage,
    *,
    classes: Sequence[str],
    rules: ReferRules = ReferRules(),
    pixel_spacing_mm: tuple[float, float] | None = None,
    modality: str | None = None,
    foreground_threshold: int = FOREGROUND_THRESHOLD,
    options: AnalyzeOptions = AnalyzeOptions(),
) -> AnalysisResult:
    """Turn the model outputs of ONE image (batch dimension 1 or none) into an :class:`AnalysisResult`.

    The Grad-CAM heatmap is mapped back and PNG-encoded only with ``options.heatmap`` (the overlay also maps it, as
    it blends it in, but returns no heatmap PNG unless asked): explanations on demand, the mask always, in one form:
    ``options.mask_format`` "png" (default) or "rle" (COCO run-length encoding; the PNG is then not encoded at all).

    ``refer`` is True when one of the model's refer ``rules`` refers the outputs (:func:`braintumor.train.refer.decide`,
    the very rules the model card and evaluation apply: the refer threshold, mask/label disagreement beyond the
    fitted area, the learned ``ood_score`` above its threshold), or when
    :func:`out_of_distribution` finds a reason in the pixels; each reason is one sentence in ``refer_reason``.
    ``mask_label_disagree`` is the disagreement rule's flag, reported also for a model without a fitted area.
    """
    probs = _one(outputs, CLASS_PROBS, 1).astype(np.float64)
    if probs.shape != (len(classes),):
        raise ValueError(f"{CLASS_PROBS} has {probs.shape[0]} classes but the model metadata lists {len(classes)}")
    if not np.isfinite(probs).all():
        raise ValueError(f"{CLASS_PROBS} contains NaN or infinity")
    index = int(np.argmax(probs))
    label = classes[index]

    mask_prob = _one(outputs, MASK_PROB, 2)
    mask = mask_to_original(mask_prob, geometry)  # at MASK_THRESHOLD, as the refer rules' area
    cam = _one(outputs, CAM, 3)  # checked on every answer: the contract holds whether or not the heatmap is asked
    heat = gradcam_heatmap(cam, index, geometry) if options.heatmap or options.want_overlay else None
    area = int(mask.sum())
    area_mm2 = None
    if pixel_spacing_mm is not None:
        area_mm2 = float(area * pixel_spacing_mm[0] * pixel_spacing_mm[1])

    ood_scores = _one(outputs, OOD_SCORE, 0).reshape(1) if rules.ood_threshold is not None else None
    decision = decide(probs[None], mask_prob[None], ood_scores, rules, classes)
    reasons = refer_reasons(decision, 0, rules, classes)
    reasons += out_of_distribution(decoded, modality=modality, foreground_threshold=foreground_threshold)

    overlay_png = encode_png(overlay(decoded.pixels, mask, heat)) if options.want_overlay else None
    return AnalysisResult(
        label=label,
        probabilities={c: round(float(p), 6) for c, p in zip(classes, probs)},  # float32 noise off the JSON
        refer=bool(reasons),
        refer_reason=reasons,
        tumor_area_px=area,
        tumor_area_mm2=area_mm2,
        mask_label_disagree=bool(decision.disagree[0]),
        original_shape=geometry.original_shape,
        mask_png=mask_png(mask) if options.mask_format == "png" else None,
        heatmap_png=encode_png(colourise(heat)) if options.heatmap else None,
        overlay_png=overlay_png,
        mask=mask,
        heatmap=heat,
        mask_rle=encode_rle(mask) if options.mask_format == "rle" else None,
    )


def out_of_distribution(
    decoded: DecodedImage,
    *,
    modality: str | None = None,
    foreground_threshold: int = FOREGROUND_THRESHOLD,
    min_std: float = MIN_STD,
    min_foreground: float = MIN_FOREGROUND,
) -> list[str]:
    """Reasons the image does not look like a brain MRI slice the model was trained on (empty: none found)."""
    reasons = []
    if decoded.is_colour:
        reasons.append("colour photograph, not an MRI slice")
    if modality is not None and modality.upper() != "MR":
        reasons.append(f"DICOM modality {modality}, not MR")
    pixels = decoded.pixels
    std = float(cv2.meanStdDev(pixels)[1][0, 0])  # population std, as numpy's; ~10x faster on a 512 px slice
    foreground = np.count_nonzero(pixels > foreground_threshold) / pixels.size
    if std < min_std:
        reasons.append(f"blank or near-constant image (grey-level standard deviation {std:.2f} < {min_std:g})")
    elif foreground < min_foreground:  # a constant image is reported once, as near-constant
        reasons.append(
            f"mostly blank image: {foreground:.2%} of pixels are above grey level {foreground_threshold} "
            f"(at least {min_foreground:.0%} expected)"
        )
    return reasons


def gradcam_heatmap(cam: np.ndarray, class_index: int, geometry: Geometry) -> np.ndarray:
    """(num_classes, h, w) bias-free CAMs -> (H, W) uint8 Grad-CAM of one class on the original image: the one
    CAM -> heatmap rule (:func:`~braintumor.train.heatmap.cam_heatmap`, as the report and ``train.gradcam``) at the
    model input size, then back through the geometry."""
    if cam.ndim != 3 or not 0 <= class_index < cam.shape[0]:
        raise ValueError(f"{CAM} of shape {cam.shape} has no map for class index {class_index}")
    return invert_geometry(heatmap_levels(cam_heatmap(cam[class_index], geometry.size)), geometry)


def colourise(heat: np.ndarray) -> np.ndarray:
    """(H, W) uint8 -> (H, W, 3) uint8 through the jet table."""
    return JET[heat]


OVERLAY_BAND_ROWS = 256  # rows blended at a time: float32 temporaries stay a few MB whatever the image size


def overlay(pixels: np.ndarray, mask: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """The slice in grey, the heatmap blended in proportion to its heat, the mask's outline in red."""
    out = np.empty((*pixels.shape, 3), np.uint8)
    for y in range(0, pixels.shape[0], OVERLAY_BAND_ROWS):
        band = slice(y, y + OVERLAY_BAND_ROWS)
        grey = pixels[band, :, None].astype(np.float32)
        alpha = (HEATMAP_ALPHA / 255.0) * heat[band].astype(np.float32)[..., None]
        out[band] = np.rint(grey * (1.0 - alpha) + colourise(heat[band]).astype(np.float32) * alpha)
    out[mask_outline(mask, max(1, round(min(mask.shape) / 256)))] = MASK_COLOUR
    return out


def mask_outline(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """Boolean (H, W): the mask's pixels within ``width`` steps (4-neighbourhood) of its edge."""
    inner = mask.astype(bool)
    for _ in range(width):
        padded = np.pad(inner, 1)  # outside the image counts as background, so the mask closes at the border
        inner = inner & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask.astype(bool) & ~inner


def encode_png(arr: np.ndarray) -> bytes:
    """uint8 (H, W) -> L PNG, (H, W, 3) -> RGB PNG. Fast compression: these PNGs are produced per request."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _one(outputs: Mapping[str, np.ndarray], name: str, ndim: int) -> np.ndarray:
    """The output ``name`` for one image, without its batch dimension(s) of 1."""
    if name not in outputs:
        raise KeyError(f"model output {name!r} is missing; got {sorted(outputs)}")
    arr = np.asarray(outputs[name])
    while arr.ndim > ndim and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != ndim:
        raise ValueError(f"model output {name!r} has shape {np.shape(outputs[name])}; expected one image")
    return arr
