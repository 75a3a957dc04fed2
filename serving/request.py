"""What a caller asked for, parsed once at the front door into one object that every later stage reads as it is.

The stages of a request (ARCHITECTURE.md, "The request path"): parse (the front door: HTTP body or gRPC message ->
the objects here) -> authenticate (api_key, before the body is read) -> decode -> preprocess -> infer -> postprocess
(:mod:`.pipeline`, :mod:`.postprocess`) -> encode (:mod:`.wire`). An option is checked here, when its object is built,
and nowhere after: a new option is one field (and its check) here, one parse per door and its use in a stage.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..clients import masks
from .errors import BadInput

EXPLAIN_METHODS = ("gradcam", "lime", "shap")


@dataclass(frozen=True)
class AnalyzeOptions:
    """What an analysis answers beyond label, probabilities, refer and area; checked when built (BadInput)."""

    heatmap: bool = False  # the Grad-CAM heatmap PNG (mapped back and encoded only then)
    overlay: bool = False  # the slice with heatmap and mask outline
    mask_format: str = "png"  # "png" (mask_png) or "rle" (COCO RLE in mask_rle, no PNG made); "" or None: png
    dicom: bool = False  # the DICOM SEG, SR and overlay (serving/dicom_answer.py); a DICOM input only

    def __post_init__(self) -> None:
        try:
            fmt = masks.check_mask_format(self.mask_format)
        except ValueError as exc:
            raise BadInput(f"{exc} (png: a greyscale PNG in mask_png, the default; rle: COCO run-length encoding in "
                           "mask_rle)") from exc
        object.__setattr__(self, "mask_format", fmt)
        object.__setattr__(self, "heatmap", bool(self.heatmap))
        object.__setattr__(self, "overlay", bool(self.overlay))
        object.__setattr__(self, "dicom", bool(self.dicom))

    @property
    def want_overlay(self) -> bool:
        """The overlay is made when asked, and for the DICOM results (their Secondary Capture shows it)."""
        return self.overlay or self.dicom


@dataclass(frozen=True)
class ExplainOptions:
    """An explanation as asked; :meth:`checked` validates it against the model and the server's bounds."""

    method: str
    target: str | None = None  # class name; None = the predicted class
    num_samples: int | None = None  # LIME perturbations
    max_evals: int | None = None  # SHAP model evaluations

    def checked(self, settings, classes: tuple[str, ...]) -> CheckedExplainOptions:
        """The options with the defaults filled in; BadInput naming the accepted values."""
        if self.method not in EXPLAIN_METHODS:
            raise BadInput(f"unknown explanation method {self.method!r}; use one of {', '.join(EXPLAIN_METHODS)}")
        if self.target is not None and self.target not in classes:
            raise BadInput(f"unknown target class {self.target!r}; use one of {', '.join(classes)} "
                           "or leave it empty for the predicted class")
        num_samples = settings.lime_num_samples if self.num_samples is None else int(self.num_samples)
        if not 10 <= num_samples <= settings.lime_max_samples:
            raise BadInput(f"num_samples={num_samples} is outside 10..{settings.lime_max_samples}")
        max_evals = settings.shap_max_evals if self.max_evals is None else int(self.max_evals)
        if not 10 <= max_evals <= settings.shap_max_max_evals:
            raise BadInput(f"max_evals={max_evals} is outside 10..{settings.shap_max_max_evals}")
        return CheckedExplainOptions(self.method, self.target, num_samples, max_evals)


@dataclass(frozen=True)
class CheckedExplainOptions(ExplainOptions):
    """Options that passed :meth:`ExplainOptions.checked` (defaults filled in); the explainer takes them as they are."""
